"""The egress policy on addresses alone: nothing here opens a connection."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from jobwatch.jobservice.egress import (
    EgressDeniedError,
    EgressPolicy,
    GuardedResolver,
    parse_networks,
)


def nets(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return parse_networks(text)


def teredo(client: str) -> str:
    # 2001::/32, a server address, flags, port, then the client address inverted.
    server = int(ipaddress.IPv4Address("192.0.2.1"))
    inverted = ~int(ipaddress.IPv4Address(client)) & 0xFFFFFFFF
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (server << 64) | inverted))


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "febf::ffff",
        "::ffff:169.254.169.254",  # v4-mapped
        "::ffff:a9fe:a9fe",  # the same, written in hex
        "::169.254.169.254",  # v4-compatible
        "64:ff9b::169.254.169.254",  # NAT64
        "2002:a9fe:a9fe::1",  # 6to4
        teredo("169.254.169.254"),
    ],
)
def test_link_local_is_denied_by_default_in_every_spelling(address: str) -> None:
    reason = EgressPolicy().check(address)
    assert reason is not None
    assert "denied range" in reason


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "::1", "10.1.2.3", "192.0.2.7", "2001:db8::1", "::ffff:10.0.0.1"]
)
def test_everything_else_is_allowed_by_default(address: str) -> None:
    assert EgressPolicy().check(address) is None


def test_check_accepts_address_objects() -> None:
    assert EgressPolicy().check(ipaddress.ip_address("169.254.1.1")) is not None
    assert EgressPolicy().check(ipaddress.ip_address("10.0.0.1")) is None


def test_reason_names_the_address_and_range() -> None:
    assert EgressPolicy().check("169.254.169.254") == (
        "169.254.169.254 is in the denied range 169.254.0.0/16"
    )
    assert EgressPolicy().check("::ffff:169.254.169.254") == (
        "::ffff:169.254.169.254 is in the denied range 169.254.0.0/16 (as 169.254.169.254)"
    )


def test_link_local_stays_denied_when_configuration_denies_more() -> None:
    policy = EgressPolicy(deny=nets("127.0.0.0/8"))
    assert policy.check("127.0.0.1") is not None
    assert policy.check("169.254.169.254") is not None
    assert policy.check("fe80::1") is not None
    assert policy.check("10.0.0.1") is None


def test_configured_v4_range_also_denies_its_v6_spellings() -> None:
    policy = EgressPolicy(deny=nets("10.0.0.0/8"))
    assert policy.check("::ffff:10.9.8.7") is not None
    assert policy.check("64:ff9b::10.9.8.7") is not None


def test_unspecified_address_counts_as_loopback() -> None:
    # Connecting to 0.0.0.0 or :: reaches the local host.
    policy = EgressPolicy(deny=nets("127.0.0.0/8, ::1/128"))
    assert policy.check("0.0.0.0") is not None
    assert policy.check("::") is not None
    assert policy.check("::ffff:0.0.0.0") is not None
    assert EgressPolicy().check("0.0.0.0") is None


def test_allow_list_admits_only_its_ranges() -> None:
    policy = EgressPolicy(allow=nets("10.0.0.0/8, fd00::/8"))
    assert policy.check("10.1.1.1") is None
    assert policy.check("::ffff:10.1.1.1") is None
    assert policy.check("fd00::5") is None
    assert policy.check("11.0.0.1") == "11.0.0.1 is not in an allowed range"
    assert policy.check("127.0.0.1") is not None
    assert policy.check("2001:db8::1") is not None


def test_deny_wins_over_allow() -> None:
    policy = EgressPolicy(deny=nets("10.0.0.0/24"), allow=nets("10.0.0.0/8, 169.254.0.0/16"))
    assert policy.check("10.0.0.5") is not None
    assert policy.check("10.0.1.5") is None
    assert policy.check("169.254.169.254") is not None


def test_empty_allow_list_denies_everything() -> None:
    policy = EgressPolicy(allow=[])
    assert policy.check("10.0.0.1") is not None
    assert policy.check("::1") is not None


def test_not_an_address() -> None:
    assert EgressPolicy().check("example.com") == "'example.com' is not an IP address"


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "a1.example", "xn--bcher-kva.example"]
)
def test_check_literal_leaves_names_to_the_resolver(host: str) -> None:
    assert EgressPolicy(allow=[]).check_literal(host) is None


def test_check_literal_checks_addresses() -> None:
    policy = EgressPolicy(deny=nets("127.0.0.2/32"))
    assert policy.check_literal("127.0.0.2") is not None
    assert policy.check_literal("127.0.0.1") is None
    assert policy.check_literal("169.254.169.254") is not None
    assert policy.check_literal("[fe80::1]") is not None
    assert policy.check_literal("fe80::1%25eth0") is not None
    assert policy.check_literal("::ffff:a9fe:a9fe") is not None


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1", "127.0.0.1.", "1::2::3"])
def test_check_literal_refuses_non_canonical_numeric_hosts(host: str) -> None:
    # The C library would still map these onto an address; aiohttp skips the resolver.
    assert EgressPolicy().check_literal(host) == f"{host} is not a canonical IP address"


def test_parse_networks() -> None:
    assert parse_networks("10.0.0.0/8, fd00::/8 ,192.0.2.1") == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.1/32"),
    ]
    assert parse_networks("") == []
    assert parse_networks(" , ") == []


def test_parse_networks_suggests_the_network_for_host_bits() -> None:
    with pytest.raises(
        ValueError, match=r"'10\.0\.0\.1/8' has host bits set; did you mean 10\.0\.0\.0/8\?"
    ):
        parse_networks("192.0.2.0/24,10.0.0.1/8")


@pytest.mark.parametrize("entry", ["nonsense", "10.0.0.0/33", "10.0.0.0/", "fe80::/129"])
def test_parse_networks_names_the_bad_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network in CIDR form") as info:
        parse_networks(f"10.0.0.0/8, {entry}")
    assert repr(entry) in str(info.value)


class FakeResolver(AbstractResolver):
    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers
        ]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_returns_only_allowed_addresses() -> None:
    inner = FakeResolver(["169.254.169.254", "10.0.0.1", "fe80::1", "10.0.0.2"])
    resolver = GuardedResolver(EgressPolicy(), inner)
    results = await resolver.resolve("mixed.test", 80)
    assert [r["host"] for r in results] == ["10.0.0.1", "10.0.0.2"]


async def test_resolver_raises_when_every_address_is_denied() -> None:
    inner = FakeResolver(["169.254.169.254", "::ffff:169.254.169.254"])
    resolver = GuardedResolver(EgressPolicy(), inner)
    with pytest.raises(EgressDeniedError) as info:
        await resolver.resolve("metadata.test", 80)
    # aiohttp only wraps resolver errors that are OSErrors.
    assert isinstance(info.value, OSError)
    assert str(info.value) == (
        "egress denied for metadata.test: 169.254.169.254 is in the denied range "
        "169.254.0.0/16; ::ffff:169.254.169.254 is in the denied range 169.254.0.0/16 "
        "(as 169.254.169.254)"
    )


async def test_resolver_closes_the_inner_one() -> None:
    inner = FakeResolver([])
    await GuardedResolver(EgressPolicy(), inner).close()
    assert inner.closed
