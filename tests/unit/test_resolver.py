"""CachingResolver against a DNS server of our own on loopback.

Network rule: every resolver here is pointed at the loopback server below (or reads
only /etc/hosts, for `localhost`), so no DNS query leaves the host.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiohttp import web

import jobwatch.jobservice.egress
from jobwatch.core.outcome import FailureKind, RequestFailure, Response
from jobwatch.jobservice.client import HttpClient, Request
from jobwatch.jobservice.egress import (
    EgressDeniedError,
    EgressPolicy,
    GuardedResolver,
    parse_networks,
)
from jobwatch.jobservice.resolver import CachingResolver

A, AAAA = 1, 28
NOERROR, NXDOMAIN = 0, 3


@dataclass
class DnsServer(asyncio.DatagramProtocol):
    """Answers A/AAAA from `records` with `ttl`; NXDOMAIN for other names; never
    answers names starting with "never"; answers names starting with "slow" after
    `delay` seconds."""

    records: dict[str, list[str]] = field(default_factory=dict)
    ttl: int = 60
    delay: float = 0.5
    queries: list[tuple[str, int]] = field(default_factory=list)
    port: int = 0
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not derive from DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        name, qtype, end = self._question(data)
        self.queries.append((name, qtype))
        if name.startswith("never"):
            return
        reply = self._reply(data, name, qtype, end)
        if name.startswith("slow"):
            asyncio.get_running_loop().call_later(self.delay, self._send, reply, addr)
        else:
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(reply, addr)

    @staticmethod
    def _question(data: bytes) -> tuple[str, int, int]:
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += 1 + data[i]
        (qtype,) = struct.unpack("!H", data[i + 1 : i + 3])
        return ".".join(labels).lower(), qtype, i + 5

    def _reply(self, data: bytes, name: str, qtype: int, end: int) -> bytes:
        addresses = self.records.get(name)
        answers = []
        for address in addresses or []:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if qtype == (AAAA if family == socket.AF_INET6 else A):
                rdata = socket.inet_pton(family, address)
                # The name is a pointer to the question's (at offset 12).
                answers.append(
                    b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, self.ttl, len(rdata)) + rdata
                )
        rcode = NXDOMAIN if addresses is None else NOERROR
        header = data[:2] + struct.pack("!HHHHH", 0x8180 | rcode, 1, len(answers), 0, 0)
        return header + data[12:end] + b"".join(answers)

    def count(self, name: str) -> int:
        return sum(1 for queried, _ in self.queries if queried == name)


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    server = DnsServer()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    server.port = transport.get_extra_info("sockname")[1]
    yield server
    transport.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeResolver = Callable[..., CachingResolver]


@pytest.fixture
async def make_resolver(dns: DnsServer) -> AsyncIterator[MakeResolver]:
    made: list[CachingResolver] = []

    def make(**options: Any) -> CachingResolver:
        resolver = CachingResolver(nameservers=[f"127.0.0.1:{dns.port}"], **options)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


async def addresses(
    resolver: CachingResolver | GuardedResolver,
    host: str,
    family: socket.AddressFamily = socket.AF_INET,
) -> list[str]:
    return [result["host"] for result in await resolver.resolve(host, 443, family)]


async def test_answers_carry_the_port_and_both_families(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    dns.records["svc.test"] = ["10.0.0.1", "fd00::1"]
    results = await make_resolver().resolve("svc.test", 8443, socket.AF_UNSPEC)
    assert sorted((r["host"], r["port"], r["family"]) for r in results) == [
        ("10.0.0.1", 8443, socket.AF_INET),
        ("fd00::1", 8443, socket.AF_INET6),
    ]
    assert all(r["hostname"] == "svc.test" for r in results)


async def test_localhost_comes_from_etc_hosts_without_a_query(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    assert await addresses(make_resolver(), "localhost") == ["127.0.0.1"]
    assert dns.queries == []


async def test_a_record_ttl_is_honoured(dns: DnsServer, make_resolver: MakeResolver) -> None:
    # Real time: c-ares caches by TTL as well, so only the clock both see will do.
    dns.ttl = 1
    dns.records["svc.test"] = ["10.0.0.1"]
    resolver = make_resolver(min_ttl=0.1)
    started = time.monotonic()
    assert await addresses(resolver, "svc.test") == ["10.0.0.1"]
    while dns.count("svc.test") == 1 and time.monotonic() - started < 5:
        assert await addresses(resolver, "svc.test") == ["10.0.0.1"]
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    assert dns.count("svc.test") == 2
    assert 1.0 <= elapsed < 1.5


async def test_ttls_below_the_floor_are_raised_to_it(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    # A TTL of 0 is not cached by c-ares either: the floor is all that saves a query.
    dns.ttl = 0
    dns.records["svc.test"] = ["10.0.0.1"]
    clock = FakeClock()
    resolver = make_resolver(min_ttl=2.0, clock=clock)
    await addresses(resolver, "svc.test")
    clock.now += 1.9
    await addresses(resolver, "svc.test")
    assert dns.count("svc.test") == 1
    clock.now += 0.2
    await addresses(resolver, "svc.test")
    assert dns.count("svc.test") == 2


async def test_a_missing_name_is_remembered_briefly(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    resolver = make_resolver(negative_ttl=5.0, clock=clock)
    for _ in range(2):
        with pytest.raises(OSError, match="Domain name not found"):
            await resolver.resolve("missing.test", 443, socket.AF_INET)
    assert dns.count("missing.test") == 1
    dns.records["missing.test"] = ["10.0.0.3"]
    clock.now += 5.1
    assert await addresses(resolver, "missing.test") == ["10.0.0.3"]
    assert dns.count("missing.test") == 2


async def test_concurrent_lookups_of_one_name_send_one_query(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    dns.records["slow.test"] = ["10.0.0.4"]
    dns.delay = 0.1
    resolver = make_resolver()
    results = await asyncio.gather(*(addresses(resolver, "slow.test") for _ in range(100)))
    assert results == [["10.0.0.4"]] * 100
    assert dns.count("slow.test") == 1


async def test_a_caller_that_gives_up_does_not_cancel_the_lookup_for_others(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    dns.records["slow.test"] = ["10.0.0.5"]
    dns.delay = 0.2
    resolver = make_resolver()
    quitter = asyncio.create_task(addresses(resolver, "slow.test"))
    stayer = asyncio.create_task(addresses(resolver, "slow.test"))
    await asyncio.sleep(0.05)
    quitter.cancel()
    assert await asyncio.wait_for(stayer, 5) == ["10.0.0.5"]
    assert quitter.cancelled()
    assert dns.count("slow.test") == 1


async def test_names_that_never_resolve_do_not_delay_one_that_does(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    dns.records["svc.test"] = ["10.0.0.6"]
    resolver = make_resolver()
    hanging = [
        asyncio.create_task(resolver.resolve(f"never-{i}.test", 443, socket.AF_UNSPEC))
        for i in range(50)
    ]
    while len(dns.queries) < 100:  # A and AAAA of each, all out
        await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await addresses(resolver, "svc.test") == ["10.0.0.6"]
    assert time.monotonic() - started < 0.1
    assert not any(task.done() for task in hanging)
    for task in hanging:
        task.cancel()
    await asyncio.gather(*hanging, return_exceptions=True)


async def test_a_lookup_that_never_resolves_ends_within_its_bound(
    make_resolver: MakeResolver,
) -> None:
    # c-ares alone would retry for 1 + 2 + 4 s.
    resolver = make_resolver(lookup_timeout=0.3, attempt_timeout=1.0, tries=3)
    started = time.monotonic()
    with pytest.raises(OSError, match=r"no answer within 0\.3s"):
        await resolver.resolve("never.test", 443, socket.AF_INET)
    assert time.monotonic() - started < 0.6


async def test_c_ares_gives_up_by_itself_after_its_tries(make_resolver: MakeResolver) -> None:
    resolver = make_resolver(lookup_timeout=5.0, attempt_timeout=0.1, tries=2)
    started = time.monotonic()
    with pytest.raises(OSError, match="Timeout while contacting DNS servers"):
        await resolver.resolve("never.test", 443, socket.AF_INET)
    assert time.monotonic() - started < 1.0


async def test_the_lru_bound_also_empties_c_ares_own_cache(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    for name in ("a.test", "b.test", "c.test"):
        dns.records[name] = ["10.0.0.7"]
    resolver = make_resolver(max_entries=2)
    for name in ("a.test", "b.test", "c.test"):
        await addresses(resolver, name)
    assert len(dns.queries) == 3
    # a.test is out of our cache, and c-ares's cache went with the channel that
    # resolved it: it is asked for again although its TTL is far from over.
    await addresses(resolver, "a.test")
    assert dns.count("a.test") == 2
    await addresses(resolver, "c.test")
    assert dns.count("c.test") == 1


# --- with the egress guard --------------------------------------------------------


async def test_the_egress_policy_applies_to_resolved_addresses(
    dns: DnsServer, make_resolver: MakeResolver
) -> None:
    dns.records["metadata.test"] = ["169.254.169.254"]
    dns.records["mixed.test"] = ["169.254.169.254", "10.0.0.8"]
    guarded = GuardedResolver(EgressPolicy(), make_resolver())
    with pytest.raises(EgressDeniedError, match=r"169\.254\.169\.254 is in the denied range"):
        await guarded.resolve("metadata.test", 80, socket.AF_INET)
    assert await addresses(guarded, "mixed.test") == ["10.0.0.8"]
    # A cached answer is checked again, not trusted.
    with pytest.raises(EgressDeniedError):
        await guarded.resolve("metadata.test", 80, socket.AF_INET)
    assert dns.count("metadata.test") == 1


async def test_guarded_resolver_uses_caching_resolver_by_default() -> None:
    guarded = GuardedResolver(EgressPolicy(deny=parse_networks("127.0.0.0/8, ::1/128")))
    try:
        with pytest.raises(EgressDeniedError, match=r"127\.0\.0\.1 is in the denied range"):
            await guarded.resolve("localhost", 80, socket.AF_INET)
    finally:
        await guarded.close()


# --- through the real HTTP client -------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "COMPLETED"})

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def send(policy: EgressPolicy, url: str) -> Response | RequestFailure:
    client = HttpClient(policy)
    try:
        return await client.send(Request(method="GET", url=url, timeout=5.0))
    finally:
        await client.aclose()


async def test_http_client_reaches_localhost_through_the_resolver(http_server: int) -> None:
    outcome = await send(EgressPolicy(), f"http://localhost:{http_server}/")
    assert isinstance(outcome, Response), outcome
    assert outcome.code == 200


AimResolver = Callable[..., None]


@pytest.fixture
def aim_resolver(dns: DnsServer, monkeypatch: pytest.MonkeyPatch) -> AimResolver:
    """HttpClient builds its resolver itself: point the default one at `dns`."""

    def aim(**options: Any) -> None:
        resolver = functools.partial(
            CachingResolver, nameservers=[f"127.0.0.1:{dns.port}"], **options
        )
        monkeypatch.setattr(jobwatch.jobservice.egress, "CachingResolver", resolver)

    return aim


async def test_http_client_resolves_names_with_c_ares(
    dns: DnsServer, http_server: int, aim_resolver: AimResolver
) -> None:
    aim_resolver()
    dns.records["job.test"] = ["127.0.0.1"]
    outcome = await send(EgressPolicy(), f"http://job.test:{http_server}/")
    assert isinstance(outcome, Response), outcome
    assert dns.count("job.test") >= 1

    denied = await send(
        EgressPolicy(deny=parse_networks("127.0.0.0/8")), f"http://job.test:{http_server}/"
    )
    assert isinstance(denied, RequestFailure)
    assert denied.kind is FailureKind.EGRESS_DENIED
    assert "127.0.0.1 is in the denied range 127.0.0.0/8" in denied.message


async def test_http_client_reports_a_name_that_never_resolves(aim_resolver: AimResolver) -> None:
    aim_resolver(lookup_timeout=0.3)
    started = time.monotonic()
    outcome = await send(EgressPolicy(), "http://never.test/")
    assert isinstance(outcome, RequestFailure)
    assert outcome.kind is FailureKind.TRANSPORT
    assert outcome.message == "DNS lookup failed for never.test (no answer within 0.3s)"
    assert time.monotonic() - started < 1.0
