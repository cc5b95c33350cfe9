"""Name resolution that one tenant's names cannot stall for the others.

aiohttp's default resolver runs getaddrinfo in a few threads; a timeout ends the wait
but not the lookup, so watches aimed at names whose DNS never answers fill the threads
and every other name-based poll times out behind them. `CachingResolver` resolves
with c-ares instead (aiodns): one c-ares thread multiplexes every lookup's datagrams,
so there is no pool to fill; /etc/hosts is still read first (for `localhost` c-ares
also answers ::1, RFC 6761); c-ares ends each lookup by itself after `tries` attempts
of `attempt_timeout` each, doubling per round. On top of that:

- each lookup's wait is bounded (`lookup_timeout`): a search list of several domains
  can add up to more than c-ares's own bound;
- one lookup per (name, family) is in flight; callers share it, and a caller that
  gives up (its request timed out) does not cancel it for the others;
- answers are cached for their records' TTL, kept within [`min_ttl`, `max_ttl`]
  (/etc/hosts answers have a TTL of 0: they get `min_ttl`); failures for
  `negative_ttl`; the cache is an LRU of `max_entries` names.

c-ares keeps a cache of its own (by record TTL, up to an hour) that pycares offers no
option to bound, and names are chosen by tenants (redirect targets too): the c-ares
channel is replaced after `max_entries` lookups, and a replaced channel is closed once
its last lookup has ended, which frees its cache and cancels whatever it still sends.

aiohttp's own DNS cache (fixed TTL, unbounded) is redundant with this one; connectors
using this resolver should pass `use_dns_cache=False`.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiodns
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult

from jobwatch.kits.ttlcache import TtlCache

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
# Errors that say nothing about the name: never cached.
_NOT_AN_ANSWER = frozenset({aiodns.error.ARES_ECANCELLED, aiodns.error.ARES_EDESTRUCTION})

Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class _Answer:
    addresses: tuple[tuple[str, int], ...]
    error: str | None


@dataclass(eq=False, slots=True)
class _Channel:
    dns: aiodns.DNSResolver
    started: int = 0
    pending: int = 0
    retired: bool = False


class CachingResolver(AbstractResolver):
    """c-ares lookups, cached by TTL, one in flight per name, each bounded in time.

    Create it inside the running event loop that will use it. `nameservers`
    ("host:port" entries) replaces the system's; None reads /etc/resolv.conf.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str] | None = None,
        lookup_timeout: float = 5.0,
        attempt_timeout: float = 1.0,
        tries: int = 2,
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_dns = functools.partial(
            aiodns.DNSResolver,
            nameservers=list(nameservers) if nameservers else None,
            loop=asyncio.get_running_loop(),
            timeout=attempt_timeout,
            tries=tries,
        )
        self._lookup_timeout = lookup_timeout
        self._min_ttl, self._max_ttl, self._negative_ttl = min_ttl, max_ttl, negative_ttl
        self._max_entries = max_entries
        self._channel = _Channel(self._make_dns())
        self._retired: set[_Channel] = set()
        self._answers: TtlCache[Key, _Answer] = TtlCache(max_entries, clock)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = (host.lower(), int(family))
        cached = self._answers.fresh(key)
        if cached is not None:
            answer = cached.value
        else:
            answer = await self._answers.load(key, functools.partial(self._lookup, key))
        if answer.error is not None:
            # aiohttp reports an OSError from the resolver as a DNS failure of the host.
            raise OSError(None, answer.error)
        return [
            ResolveResult(
                hostname=host, host=address, port=port, family=af, proto=0, flags=_NUMERIC
            )
            for address, af in answer.addresses
        ]

    async def close(self) -> None:
        await self._answers.close()
        for channel in (self._channel, *self._retired):
            await channel.dns.close()
        self._retired.clear()

    def _next_channel(self) -> _Channel:
        channel = self._channel
        if channel.started >= self._max_entries:
            channel.retired = True
            self._retired.add(channel)
            channel = self._channel = _Channel(self._make_dns())
        channel.started += 1
        return channel

    async def _lookup(self, key: Key) -> _Answer:
        host, family = key
        channel = self._next_channel()
        channel.pending += 1
        try:
            async with asyncio.timeout(self._lookup_timeout):
                result = await channel.dns.getaddrinfo(
                    host,
                    family=socket.AddressFamily(family),
                    type=socket.SOCK_STREAM,
                    flags=socket.AI_ADDRCONFIG,
                )
        except TimeoutError:
            answer, ttl = self._failure(f"no answer within {self._lookup_timeout:g}s")
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            message = str(exc.args[1]) if len(exc.args) > 1 else "DNS lookup failed"
            if code in _NOT_AN_ANSWER:
                return _Answer((), message)
            answer, ttl = self._failure(message)
        else:
            answer, ttl = self._success(result)
        finally:
            channel.pending -= 1
            if channel.retired and channel.pending == 0:
                self._retired.discard(channel)
                await channel.dns.close()
        self._answers.put(key, answer, ttl)
        return answer

    def _failure(self, message: str) -> tuple[_Answer, float]:
        return _Answer((), message), self._negative_ttl

    def _success(self, result: pycares.AddrInfoResult) -> tuple[_Answer, float]:
        addresses: list[tuple[str, int]] = []
        for node in result.nodes:
            address = node.addr[0].decode("ascii")
            scope = node.addr[3] if len(node.addr) > 3 else 0
            # Only link-local v6 addresses carry a scope, and the egress policy denies
            # those; keep it so that the policy sees what would be connected to.
            addresses.append((f"{address}%{scope}" if scope else address, node.family))
        if not addresses:
            return self._failure("DNS lookup returned no addresses")
        ttls = [node.ttl for node in result.nodes] + [cname.ttl for cname in result.cnames]
        ttl = min(self._max_ttl, max(self._min_ttl, min(ttls)))
        return _Answer(tuple(addresses), None), ttl
