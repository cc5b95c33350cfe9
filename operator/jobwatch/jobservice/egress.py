"""Which addresses the operator may connect to, and the resolver that enforces it.

Users choose the URLs that are polled, so a URL must not reach the cloud metadata
service or whatever else the operator's configuration denies. The check runs on
resolved addresses, and the connection goes only to addresses that passed it:
`GuardedResolver` hands aiohttp the checked addresses and nothing else, so a DNS
answer that changes between check and connect (rebinding) cannot slip through.
aiohttp does not call the resolver for IP-literal hosts; `EgressPolicy.check_literal`
covers those and must be called before every request (redirect hops included).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from aiohttp.abc import AbstractResolver, ResolveResult

from jobwatch.jobservice.resolver import CachingResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link-local: where cloud metadata services answer (169.254.169.254). No
# configuration can allow these.
ALWAYS_DENIED: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("169.254.0.0/16"),
    ipaddress.IPv6Network("fe80::/10"),
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Connecting to the unspecified address reaches the local host on Linux.
_UNSPECIFIED_MEANS: dict[int, IPAddress] = {
    4: ipaddress.IPv4Address("127.0.0.1"),
    6: ipaddress.IPv6Address("::1"),
}


class EgressDeniedError(OSError):
    """A destination refused by the policy.

    An OSError because aiohttp treats resolver failures as OSError: it wraps this
    in ClientConnectorDNSError (keeping it as the cause) instead of crashing.
    """


def parse_networks(text: str) -> list[IPNetwork]:
    """Comma-separated CIDRs (or bare addresses) from configuration.

    Empty entries are ignored, so "" is an empty list. Raises ValueError naming
    the bad entry.
    """
    networks: list[IPNetwork] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP network in CIDR form (like 10.0.0.0/8 or fd00::/8)"
                ) from exc
            raise ValueError(f"{entry!r} has host bits set; did you mean {loose}?") from exc
    return networks


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a v6 address stands for, if it is one of the forms that
    carry one (mapped, compatible, NAT64, 6to4, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


MAX_REMEMBERED_HOSTS = 4096


class EgressPolicy:
    """Denied and allowed address ranges. Deny always wins over allow."""

    def __init__(
        self, deny: Sequence[IPNetwork] = (), allow: Sequence[IPNetwork] | None = None
    ) -> None:
        self.deny: tuple[IPNetwork, ...] = ALWAYS_DENIED + tuple(
            net for net in deny if net not in ALWAYS_DENIED
        )
        self.allow: tuple[IPNetwork, ...] | None = None if allow is None else tuple(allow)
        # Every poll of a watch checks the same host again; the ranges never change.
        self._literal_verdicts: dict[str, str | None] = {}

    def check(self, ip: str | IPAddress) -> str | None:
        """None when `ip` may be connected to, else the reason it may not."""
        try:
            address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        except ValueError:
            return f"{ip!r} is not an IP address"
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            address = ipaddress.IPv6Address(address.packed)

        # What the socket really talks to: a v4-mapped address is a v4 connection.
        effective: IPAddress = address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            effective = address.ipv4_mapped
        if effective.is_unspecified:
            effective = _UNSPECIFIED_MEANS[effective.version]

        # Deny on anything the address could stand for, so that no v6 spelling of
        # a denied v4 address passes.
        candidates: list[IPAddress] = [address, effective]
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                candidates.append(embedded)
        for candidate in candidates:
            for net in self.deny:
                if candidate.version == net.version and candidate in net:
                    alias = "" if candidate == address else f" (as {candidate})"
                    return f"{ip} is in the denied range {net}{alias}"

        if self.allow is not None and not any(
            effective.version == net.version and effective in net for net in self.allow
        ):
            return f"{ip} is not in an allowed range"
        return None

    def check_literal(self, host: str) -> str | None:
        """Check a URL host that aiohttp will connect to without resolving it.

        Mirrors aiohttp's own test for "this host is an IP address" (a colon, or
        only digits and dots), so every host that skips the resolver is checked
        here. Such a host that is not a canonical address (2130706433, 127.1)
        is refused: the system would still map it onto some address. Returns None
        for host names; the resolver checks those.
        """
        if not (":" in host or host.replace(".", "").isdigit()):
            return None
        try:
            return self._literal_verdicts[host]
        except KeyError:
            pass
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            verdict: str | None = f"{host} is not a canonical IP address"
        else:
            verdict = self.check(address)
        if len(self._literal_verdicts) >= MAX_REMEMBERED_HOSTS:
            self._literal_verdicts.clear()
        self._literal_verdicts[host] = verdict
        return verdict


def _reasons(reasons: Iterable[str]) -> str:
    unique = list(dict.fromkeys(reasons))
    return "; ".join(unique[:3]) + ("; …" if len(unique) > 3 else "")


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and returns only the addresses the policy allows.

    aiohttp connects only to what the resolver returns and caches only that, so
    checking here, on every resolution, covers DNS rebinding and the DNS cache.
    `inner` defaults to a `CachingResolver` (c-ares, TTL cache, bounded lookups), so
    create this inside the running event loop.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else CachingResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for result in results:
            reason = self._policy.check(result["host"])
            if reason is None:
                allowed.append(result)
            else:
                reasons.append(reason)
        if not allowed and reasons:
            raise EgressDeniedError(f"egress denied for {host}: {_reasons(reasons)}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
