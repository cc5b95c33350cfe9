"""Per-host politeness: the breaker's states, the adaptive in-flight limit, the rate cap
and the Retry-After hold with a fake clock; their knobs; and what a watch sees of them."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from runtime_fakes import FakeApi, assert_invariant, jobwatch, until

from jobwatch.app.config import Config, ConfigError
from jobwatch.control.runtime import Runtime
from jobwatch.core import policy
from jobwatch.core.outcome import FailureKind, Outcome, RequestFailure, Response
from jobwatch.jobservice.client import Request
from jobwatch.jobservice.hosts import (
    MAX_LABELLED_HOSTS,
    MIN_IN_FLIGHT,
    RECHECK_SECONDS,
    SHRINK,
    BreakerState,
    Held,
    HeldReason,
    Host,
    HostLimits,
    Hosts,
    HostSettings,
    Limit,
    Probe,
    Ticket,
    Verdict,
    adaptive,
    fixed,
    parse_limits,
    verdict,
)
from jobwatch.kits.metrics import Metrics

A = ("ns", ("http", "jobs.test", 80))
B = ("ns", ("https", "other.test", 443))
SETTINGS = HostSettings(
    limits=fixed(10.0, 3),
    breaker_failures=3,
    cooldown=5.0,
    max_cooldown=30.0,
)


def table(settings: HostSettings = SETTINGS) -> Hosts:
    return Hosts(settings, rand=lambda: 0.0)


def ticket(hosts: Hosts, key: Any, now: float) -> Ticket:
    admitted = hosts.admit(key, now)
    assert not isinstance(admitted, Held), admitted
    return admitted


def held(hosts: Hosts, key: Any, now: float) -> Held:
    admitted = hosts.admit(key, now)
    assert isinstance(admitted, Held), "expected the poll to be held"
    return admitted


def fail(hosts: Hosts, key: Any, now: float, times: int) -> None:
    """`times` failures in a row, each a different watch's request."""
    for n in range(times):
        hosts.done(ticket(hosts, key, now + n * 0.2), Verdict.FAILED, now + n * 0.2, None)


def state(hosts: Hosts, key: Any) -> BreakerState:
    host = hosts.get(key)
    assert host is not None
    return host.state


# --- the key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("http://Jobs.Test/a?b=1", ("http", "jobs.test", 80)),
        ("http://jobs.test:80/other", ("http", "jobs.test", 80)),
        ("https://jobs.test/a", ("https", "jobs.test", 443)),
        ("http://jobs.test:8080/a", ("http", "jobs.test", 8080)),
        ("http://user:pw@[::1]:9000/x", ("http", "::1", 9000)),
    ],
)
def test_the_key_is_the_namespace_and_the_urls_origin(url: str, key: tuple[str, str, int]) -> None:
    assert table().key("team-a", url) == ("team-a", key)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Response(200, {}, "", 1), Verdict.ANSWERED),
        (Response(404, {}, "", 1), Verdict.ANSWERED),
        (Response(429, {}, "", 1), Verdict.ANSWERED),
        (Response(500, {}, "", 1), Verdict.FAILED),
        (Response(503, {}, "", 1), Verdict.FAILED),
        (Response(503, {}, "", 1, redirects=1), Verdict.ANSWERED),
        (RequestFailure(FailureKind.TRANSPORT, "refused", host_failed=True), Verdict.FAILED),
        (RequestFailure(FailureKind.TRANSPORT, "the CA bundle is empty"), Verdict.NOTHING),
        (RequestFailure(FailureKind.INVALID_RESPONSE, "body too big"), Verdict.ANSWERED),
        (RequestFailure(FailureKind.EGRESS_DENIED, "denied"), Verdict.NOTHING),
    ],
)
def test_what_an_outcome_says_about_the_host(outcome: Outcome, expected: Verdict) -> None:
    assert verdict(outcome) is expected


# --- the breaker --------------------------------------------------------------------------


def test_a_run_of_failures_across_watches_opens_the_breaker() -> None:
    hosts = table()
    fail(hosts, A, 0.0, 2)
    assert state(hosts, A) is BreakerState.CLOSED
    fail(hosts, A, 1.0, 1)
    assert state(hosts, A) is BreakerState.OPEN
    stop = held(hosts, A, 1.5)
    assert stop.reason is HeldReason.CIRCUIT_OPEN
    assert stop.until == pytest.approx(6.0)  # the failure at 1.0 + the 5 s cool-down
    assert "circuit breaker of http://jobs.test:80 is open" in stop.message
    assert "1970-01-01T00:00:06.000Z" in stop.message
    ticket(hosts, B, 1.5)  # another host is not concerned


def test_an_answer_breaks_the_run() -> None:
    hosts = table()
    fail(hosts, A, 0.0, 2)
    hosts.done(ticket(hosts, A, 1.0), Verdict.ANSWERED, 1.0, None)
    fail(hosts, A, 2.0, 2)
    assert state(hosts, A) is BreakerState.CLOSED


def test_errors_of_the_watch_not_the_host_do_not_count() -> None:
    hosts = table()
    for n in range(10):  # 4xx, bad bodies: the host answered
        hosts.done(ticket(hosts, A, n), verdict(Response(404, {}, "", 1)), n, None)
        hosts.done(ticket(hosts, A, n + 0.5), Verdict.NOTHING, n + 0.5, None)
    assert state(hosts, A) is BreakerState.CLOSED


def test_after_the_cool_down_exactly_one_probe_goes_and_its_answer_closes() -> None:
    hosts = table()
    fail(hosts, A, 0.0, 3)  # opens at 0.4 until 5.4
    assert held(hosts, A, 5.3).reason is HeldReason.CIRCUIT_OPEN
    probe = ticket(hosts, A, 5.4)
    assert isinstance(probe, Probe)
    assert state(hosts, A) is BreakerState.HALF_OPEN
    for now in (5.5, 6.0, 9.0):  # however many watches come meanwhile: no second probe
        other = held(hosts, A, now)
        assert other.reason is HeldReason.CIRCUIT_OPEN
        assert "half-open" in other.message
        assert other.until > now
    hosts.done(probe, Verdict.ANSWERED, 9.5, None)
    assert state(hosts, A) is BreakerState.CLOSED
    assert not isinstance(hosts.admit(A, 9.6), Held | Probe)


def test_a_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    hosts = table()
    fail(hosts, A, 0.0, 3)
    now, cooldowns = 5.4, []
    for _ in range(5):
        probe = ticket(hosts, A, now)
        assert isinstance(probe, Probe)
        hosts.done(probe, Verdict.FAILED, now, None)
        stop = held(hosts, A, now)
        cooldowns.append(stop.until - now)
        now = stop.until
    assert cooldowns == pytest.approx([10.0, 20.0, 30.0, 30.0, 30.0])
    probe = ticket(hosts, A, now)
    hosts.done(probe, Verdict.ANSWERED, now, None)
    fail(hosts, A, now + 1, 3)  # a fresh opening starts from the first cool-down again
    assert held(hosts, A, now + 2).until == pytest.approx(now + 1.4 + 5.0)


def test_a_probe_that_was_not_sent_lets_the_next_watch_probe() -> None:
    hosts = table()
    fail(hosts, A, 0.0, 3)
    probe = ticket(hosts, A, 6.0)
    hosts.done(probe, Verdict.NOTHING, 6.0, None)
    assert state(hosts, A) is BreakerState.HALF_OPEN
    assert isinstance(ticket(hosts, A, 6.1), Probe)


def test_late_outcomes_of_requests_sent_before_the_opening_change_nothing() -> None:
    hosts = table()
    early = [ticket(hosts, A, 0.0), ticket(hosts, A, 0.0)]
    fail(hosts, A, 0.1, 3)
    open_until = held(hosts, A, 1.0).until
    hosts.done(early[0], Verdict.FAILED, 2.0, None)  # does not extend the opening
    hosts.done(early[1], Verdict.ANSWERED, 2.0, None)  # nor close it
    assert state(hosts, A) is BreakerState.OPEN
    assert held(hosts, A, 3.0).until == open_until


def test_no_breaker_when_its_failures_are_zero() -> None:
    hosts = table(HostSettings(breaker_failures=0))
    fail(hosts, A, 0.0, 50)
    assert state(hosts, A) is BreakerState.CLOSED


# --- rate cap, fixed in-flight cap, Retry-After ------------------------------------------


def test_a_crowd_is_spread_by_the_rate_limit_with_a_slot_kept_for_each() -> None:
    hosts = table()  # 10/s, and a burst of 0.1 s: one request more
    for _ in range(2):
        hosts.done(ticket(hosts, A, 0.0), Verdict.ANSWERED, 0.0, None)
    waits = [held(hosts, A, 0.0) for _ in range(20)]
    assert all(w.reason is HeldReason.RATE_LIMITED and w.slot for w in waits)
    assert [w.until for w in waits] == pytest.approx([0.1 * n for n in range(1, 21)])
    # Each comes back at its slot and is let through, whatever the others did.
    for wait in waits:
        admitted = hosts.admit(A, wait.until, reserved=True)
        assert not isinstance(admitted, Held)
        hosts.done(admitted, Verdict.ANSWERED, wait.until, None)
    # A newcomer queues behind the kept slots: never more than 10/s overall.
    assert held(hosts, A, 0.5).until == pytest.approx(2.1)


def test_the_in_flight_cap_holds_until_a_request_ends() -> None:
    hosts = table(HostSettings(limits=fixed(None, 3)))
    out = [ticket(hosts, A, n * 0.01) for n in range(3)]
    wait = held(hosts, A, 0.05)
    assert wait.reason is HeldReason.RATE_LIMITED and not wait.slot
    assert "in flight to http://jobs.test:80 from this namespace's JobWatches: 3, at its " in (
        wait.message
    )
    assert "limit of 3 (fixed)" in wait.message
    assert 0.05 < wait.until <= 1.05
    hosts.done(out[0], Verdict.ANSWERED, 0.06, None)
    ticket(hosts, A, 0.07)


def test_retry_after_holds_every_watch_of_the_host() -> None:
    hosts = table()
    hosts.done(ticket(hosts, A, 0.0), Verdict.FAILED, 0.0, 3.0)
    for now in (0.5, 2.9):
        wait = held(hosts, A, now)
        assert wait.reason is HeldReason.RETRY_AFTER
        assert wait.until == pytest.approx(3.0)
        assert "Retry-After" in wait.message
    ticket(hosts, B, 1.0)
    ticket(hosts, A, 3.0)
    assert hosts.held[HeldReason.RETRY_AFTER] == 2


def test_a_retry_after_hold_is_capped() -> None:
    hosts = table()
    hosts.done(ticket(hosts, A, 0.0), Verdict.ANSWERED, 0.0, 10**9)
    assert held(hosts, A, 1.0).until == pytest.approx(30.0)  # max_cooldown


def test_the_table_is_bounded_and_an_evicted_host_starts_fresh() -> None:
    hosts = table(HostSettings(breaker_failures=1, max_hosts=2))
    out = ticket(hosts, A, 0.0)
    fail(hosts, A, 0.0, 1)
    ticket(hosts, B, 1.0)
    ticket(hosts, ("ns", ("http", "c.test", 80)), 1.0)
    assert len(hosts) == 2 and hosts.get(A) is None
    hosts.done(out, Verdict.FAILED, 1.5, None)  # a ticket of an evicted host is harmless
    ticket(hosts, A, 2.0)
    assert state(hosts, A) is BreakerState.CLOSED


def test_the_breaker_gauge_names_at_most_a_few_hosts() -> None:
    hosts = table(HostSettings(breaker_failures=1))
    for n in range(MAX_LABELLED_HOSTS + 7):
        fail(hosts, ("ns", ("http", f"h{n}.test", 80)), 0.0, 1)
    ticket(hosts, ("ns", ("http", "fine.test", 80)), 0.0)
    # The same origin open in two namespaces is one series, counting both.
    fail(hosts, ("other-ns", ("http", f"h{MAX_LABELLED_HOSTS + 6}.test", 80)), 0.0, 1)
    states = hosts.states()
    assert len(states) == MAX_LABELLED_HOSTS + 1
    assert states["other"] == {"open": 7}
    assert states[f"http://h{MAX_LABELLED_HOSTS + 6}.test:80"] == {"open": 2}
    assert "http://fine.test:80" not in states


def test_one_namespace_cannot_hold_anothers_watches_of_a_shared_host() -> None:
    # A shared gateway: one tenant's backend fails and asks for a long pause.
    hosts = table()
    theirs, ours = ("tenant-a", A[1]), ("tenant-b", A[1])
    fail(hosts, theirs, 0.0, SETTINGS.breaker_failures)
    assert state(hosts, theirs) is BreakerState.OPEN
    hosts.done(ticket(hosts, ours, 1.0), Verdict.ANSWERED, 1.0, 300.0)
    for n in range(SETTINGS.limits.max_in_flight):  # a third one's slow requests fill its cap
        ticket(hosts, ("tenant-c", A[1]), 2.0 + n * 0.1)
    assert held(hosts, ("tenant-c", A[1]), 3.0).reason is HeldReason.RATE_LIMITED
    assert held(hosts, theirs, 3.0).reason is HeldReason.CIRCUIT_OPEN
    assert held(hosts, ours, 3.0).reason is HeldReason.RETRY_AFTER  # its own answer's pause
    assert isinstance(hosts.admit(("tenant-d", A[1]), 3.0), Host)


def test_per_host_overrides_apply_and_are_fixed() -> None:
    overrides = parse_limits("jobs.test:80=2/1, [::1]:9000=0.5/4, other.test:443=0/50")
    assert overrides == {
        "jobs.test:80": HostLimits(2.0, 1, 1),
        "::1:9000": HostLimits(0.5, 4, 4),
        "other.test:443": HostLimits(None, 50, 50),  # 0: no rate cap
    }
    hosts = table(HostSettings(overrides=overrides))
    ticket(hosts, A, 0.0)
    assert "at its limit of 1 (fixed)" in held(hosts, A, 0.0).message
    host = hosts.get(A)
    assert host is not None and host.limits == HostLimits(2.0, 1, 1)
    # No rate cap, and 50 in flight however slow the answers: a known quota is not adapted.
    out = [ticket(hosts, B, 0.0) for _ in range(50)]
    assert held(hosts, B, 0.0).reason is HeldReason.RATE_LIMITED
    for n in range(500):
        hosts.done(out.pop(), Verdict.ANSWERED, n * 0.1, None, latency=n * 0.1)
        out.append(ticket(hosts, B, n * 0.1))
    other = hosts.get(B)
    assert other is not None and other.limit.allowed == 50


# --- the adaptive in-flight limit -----------------------------------------------------------


def window(
    limit: Limit,
    now: float,
    answered: float | None,
    in_flight: int,
    *,
    overloads: int = 0,
    n: int = 10,
) -> float:
    """Exchanges until `limit` revises itself once: `in_flight` out at once, `n` or so
    ending in each half second, each answered in `answered` seconds (None: no answer), the
    first `overloads` of them failures or Retry-After answers. Returns the time after."""
    limit.sent(in_flight)
    ended = 0
    while True:
        now += 0.5 / n
        limit.ended(now, answered, ended < overloads, in_flight)
        ended += 1
        if limit.exchanges == 0:
            return now


def grown(to: int) -> tuple[Limit, float]:
    """A limit that grew to `to` at answers of 20 ms."""
    limit, now = Limit(MIN_IN_FLIGHT, 200), 0.0
    while limit.allowed < to:
        now = window(limit, now, 0.02, limit.allowed)
    return limit, now


def test_the_limit_grows_while_the_host_answers_as_fast_as_usual_up_to_its_ceiling() -> None:
    limit, now = Limit(MIN_IN_FLIGHT, 200), 0.0
    assert limit.allowed == MIN_IN_FLIGHT
    seen = []
    for _ in range(40):
        now = window(limit, now, 0.02, in_flight=limit.allowed)  # the watches press on it
        seen.append(limit.allowed)
    assert seen == sorted(seen)
    assert seen[0] > MIN_IN_FLIGHT
    assert seen.index(200) < 25  # from 20 to 200 within 25 windows (12.5 s at high rates)
    assert seen[-1] == 200


def test_the_limit_does_not_grow_for_watches_that_do_not_need_it() -> None:
    limit, now = Limit(MIN_IN_FLIGHT, 200), 0.0
    for _ in range(40):
        now = window(limit, now, 0.02, in_flight=MIN_IN_FLIGHT // 2 - 1)
    assert limit.allowed == MIN_IN_FLIGHT


def test_slower_answers_shrink_it_step_by_step_down_to_the_floor() -> None:
    limit, now = grown(150)
    usual = limit.usual
    steps = [limit.value]
    for _ in range(20):
        now = window(limit, now, 0.5, in_flight=limit.allowed)  # every answer 25 times slower
        steps.append(limit.value)
    assert all(SHRINK * a - 1e-9 <= b < a for a, b in itertools.pairwise(steps[:8]))
    assert steps[-1] == MIN_IN_FLIGHT  # and no lower
    # A queue the watches press on does not become the usual answer time.
    assert limit.usual == usual


def test_answers_slower_within_the_tolerance_are_no_reason_to_shrink() -> None:
    limit, now = grown(60)
    before = limit.allowed
    now = window(limit, now, 0.02 * 2 + 0.09, in_flight=limit.allowed)  # usual x 2 + 90 ms
    assert limit.allowed > before


def test_one_slow_window_costs_little_and_the_limit_grows_back() -> None:
    # A pause of this process (GC, a busy event loop) delays the answers of one window.
    limit, now = grown(120)
    before = limit.value
    now = window(limit, now, 1.0, in_flight=limit.allowed)
    assert limit.value >= before * SHRINK
    for _ in range(5):
        now = window(limit, now, 0.02, in_flight=limit.allowed)
    assert limit.value > before


def test_failures_or_retry_after_from_a_tenth_of_a_window_halve_it() -> None:
    limit, now = grown(160)
    before = limit.value
    now = window(limit, now, 0.02, in_flight=limit.allowed, overloads=1, n=100)
    assert limit.value > before  # one failure in 100: a broken job, not the host
    before = limit.value
    now = window(limit, now, 0.02, in_flight=limit.allowed, overloads=12, n=100)
    assert limit.value == pytest.approx(before / 2)
    window(limit, now, None, in_flight=limit.allowed, overloads=12)  # timeouts only
    assert limit.value == pytest.approx(before / 4)


def test_the_hosts_failures_and_retry_after_reach_its_limit() -> None:
    hosts = table(HostSettings(limits=adaptive(200), breaker_failures=0))
    out = [ticket(hosts, A, 0.0) for _ in range(MIN_IN_FLIGHT)]
    host = hosts.get(A)
    assert host is not None
    host.limit.value = 100.0
    for n, sent in enumerate(out):  # 429s with Retry-After: 1
        hosts.done(sent, Verdict.ANSWERED, 0.05 * (n + 1), 1.0, latency=0.01)
    assert host.limit.value == pytest.approx(50.0)


def test_the_breaker_opening_sets_the_limit_back_to_its_floor() -> None:
    hosts = table(HostSettings(limits=adaptive(200), breaker_failures=3))
    host = hosts.admit(A, 0.0)
    assert isinstance(host, Host)
    hosts.done(host, Verdict.ANSWERED, 0.0, None, latency=0.01)
    host.limit.value = 150.0
    fail(hosts, A, 1.0, 3)
    assert host.state is BreakerState.OPEN
    assert host.limit.allowed == MIN_IN_FLIGHT


def test_a_fixed_limit_never_moves() -> None:
    limit, now = Limit(7, 7), 0.0
    for answered in (0.01, 5.0, None):
        now = window(limit, now, answered, in_flight=7, overloads=10)
        assert limit.allowed == 7


@dataclass
class Served:
    rate: float  # requests per second the host got, over the second half
    in_flight: list[int]  # requests in flight to it at each request sent, second half
    slowest: float  # the slowest answer, second half
    holds: int  # polls held, second half


def serve(
    limits: HostLimits,
    watches: int,
    interval: float,
    *,
    slots: int,
    service: float,
    seconds: float = 60.0,
    in_order: bool = True,
) -> Served:
    """`watches` poll a host that answers `slots` requests at a time, in `service`
    seconds each (±20 %), and queues the rest, first come first served or (`in_order`
    false) in any order, as a worker pool's lock does; each polls again `interval` (±10 %)
    after its answer, and a held poll looks again when its hold says. All through `Hosts`
    on a fake clock: what the runtime does, without the runtime."""
    rnd = random.Random(7)
    hosts = Hosts(HostSettings(limits=limits), rand=rnd.random)
    plan: list[tuple[float, int, str, Ticket | None, float]] = []  # time, seq, what, ...
    seq = 0

    def at(time: float, what: str, sent: Ticket | None = None, start: float = 0.0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(plan, (time, seq, what, sent, start))

    for n in range(watches):  # the operator spreads the first round at 1,000/s
        at(n / 1000.0, "due")
    busy, queue = 0, []
    half = seconds / 2
    sent_at: list[float] = []
    in_flight: list[int] = []
    slowest, holds = 0.0, 0
    while plan:
        now, _, what, sent, start = heapq.heappop(plan)
        if now > seconds:
            break
        if what == "due":
            admitted = hosts.admit(A, now)
            if isinstance(admitted, Held):
                holds += now > half
                at(admitted.until, "due")
                continue
            if now > half:
                sent_at.append(now)
                in_flight.append(admitted.in_flight if isinstance(admitted, Host) else 1)
            if busy < slots:
                busy += 1
                at(now + service * rnd.uniform(0.8, 1.2), "answer", admitted, now)
            else:
                queue.append((admitted, now))
        else:
            assert sent is not None
            hosts.done(sent, Verdict.ANSWERED, now, None, latency=now - start)
            if now > half:
                slowest = max(slowest, now - start)
            at(now + interval * rnd.uniform(0.9, 1.1), "due")
            if queue:
                waiting, since = queue.pop(0 if in_order else rnd.randrange(len(queue)))
                at(now + service * rnd.uniform(0.8, 1.2), "answer", waiting, since)
            else:
                busy -= 1
    return Served(len(sent_at) / half, in_flight, slowest, holds)


def median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


@pytest.mark.parametrize("in_order", [True, False])
def test_a_host_that_queues_gets_its_capacity_without_a_pile_up(in_order: bool) -> None:
    # 300 watches at 1 s ask 300/s of a host that serves 8 at a time in 50 ms: 160/s.
    served = serve(adaptive(200), 300, 1.0, slots=8, service=0.05, in_order=in_order)
    assert served.rate >= 0.95 * 160
    assert median(served.in_flight) <= 2.5 * MIN_IN_FLIGHT
    if not in_order:
        return  # some answers wait long, whatever the limit
    assert served.slowest < 0.5
    # The same with a fixed cap as high: as many polls, but a queue of a hundred and more
    # at the host, and answers four times slower.
    piled = serve(fixed(None, 200), 300, 1.0, slots=8, service=0.05)
    assert piled.rate == pytest.approx(served.rate, rel=0.05)
    assert median(piled.in_flight) > 100
    assert piled.slowest > 2 * served.slowest


def test_a_slow_but_healthy_host_gets_every_poll() -> None:
    # Answers in 150 ms, any number at once: 300 watches at 1 s need about 40 in flight.
    served = serve(adaptive(200), 300, 1.0, slots=10_000, service=0.15)
    assert served.rate >= 0.97 * 300 / 1.15
    assert served.holds == 0  # once the limit has grown, nothing waits for it
    # The fixed cap of 20 before it adapted: about 133 of the 260 polls/s.
    capped = serve(fixed(None, MIN_IN_FLIGHT), 300, 1.0, slots=10_000, service=0.15)
    assert capped.rate < 0.6 * served.rate


def test_a_host_that_serves_two_at_a_time_is_offered_about_the_floor() -> None:
    # Its usual answer time is learnt at up to 20 in flight, already a queue of 18.
    served = serve(adaptive(200), 300, 1.0, slots=2, service=0.05)
    assert served.rate >= 0.95 * 40
    assert max(served.in_flight) <= 1.5 * MIN_IN_FLIGHT


def test_delays_are_counted_per_host_under_a_bounded_set_of_labels() -> None:
    hosts = table()
    for n in range(MAX_LABELLED_HOSTS + 5):
        hosts.delayed(("ns", ("http", f"h{n}.test", 80)), 0.5)
    hosts.delayed(("other-ns", ("http", "h0.test", 80)), 1.0)  # same origin: same series
    delays = hosts.delays()
    assert len(delays) == MAX_LABELLED_HOSTS + 1
    assert delays["http://h0.test:80"] == (2, 1.5)
    assert delays["other"] == (5, 2.5)
    # A label once given stays, so that no counter moves between series.
    hosts.delayed(("ns", ("http", f"h{MAX_LABELLED_HOSTS + 1}.test", 80)), 0.5)
    assert hosts.delays()["other"] == (6, 3.0)


# --- configuration ------------------------------------------------------------------------


def test_host_defaults() -> None:
    settings = Config.from_env({}).hosts
    # No rate cap; in flight adaptive from 20 up to the process's own cap.
    assert settings.limits == HostLimits(qps=None, max_in_flight=200, min_in_flight=20)
    assert Config.from_env({"JOBWATCH_MAX_IN_FLIGHT": "500"}).hosts.limits == adaptive(500)
    assert settings.breaker_failures == 10
    assert (settings.cooldown, settings.max_cooldown) == (5.0, 300.0)
    assert settings.overrides == {}


def test_host_values_are_read() -> None:
    settings = Config.from_env(
        {
            "JOBWATCH_HOST_QPS": "5",
            "JOBWATCH_HOST_MAX_IN_FLIGHT": "2",
            "JOBWATCH_HOST_BREAKER_FAILURES": "0",
            "JOBWATCH_HOST_BREAKER_COOLDOWN": "1s",
            "JOBWATCH_HOST_BREAKER_MAX_COOLDOWN": "1m",
            "JOBWATCH_HOST_LIMITS": "Jobs.Test:8080=100/50",
        }
    ).hosts
    # A ceiling below the floor is the floor too: a fixed limit.
    assert settings.limits == HostLimits(5.0, 2, 2)
    assert (settings.breaker_failures, settings.cooldown, settings.max_cooldown) == (0, 1, 60)
    assert settings.overrides == {"jobs.test:8080": fixed(100.0, 50)}
    assert Config.from_env({"JOBWATCH_HOST_QPS": "0"}).hosts.limits.qps is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOBWATCH_HOST_QPS", "-1"),
        ("JOBWATCH_HOST_QPS", "0.001"),
        ("JOBWATCH_HOST_QPS", "inf"),
        ("JOBWATCH_HOST_QPS", "nan"),
        ("JOBWATCH_HOST_MAX_IN_FLIGHT", "0"),
        ("JOBWATCH_HOST_BREAKER_FAILURES", "-1"),
        ("JOBWATCH_HOST_BREAKER_COOLDOWN", "0s"),
        ("JOBWATCH_HOST_BREAKER_COOLDOWN", "10m"),
        ("JOBWATCH_HOST_BREAKER_MAX_COOLDOWN", "5"),
        ("JOBWATCH_HOST_LIMITS", "jobs.test=5/1"),
        ("JOBWATCH_HOST_LIMITS", "jobs.test:80=5"),
        ("JOBWATCH_HOST_LIMITS", "jobs.test:80=-1/1"),
        ("JOBWATCH_HOST_LIMITS", "jobs.test:80=5/0"),
        ("JOBWATCH_HOST_LIMITS", "jobs.test:99999=5/1"),
    ],
)
def test_bad_host_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert variable in str(caught.value)


# --- what a watch sees --------------------------------------------------------------------


def test_a_held_poll_keeps_the_error_streak() -> None:
    error = policy.LastError(policy.ErrorClass.TRANSIENT, "connection refused")
    decision = policy.host_held(
        policy.Phase.POLLING, 4, error, "HostCircuitOpen", "m", delay=9.0, now=0.0, deadline=5.0
    )
    assert (decision.consecutive_errors, decision.error, decision.delay) == (4, error, 5.0)
    assert not decision.finished


class DownHttp:
    """Two job services: `down.test` refuses every connection, `up.test` answers (with
    the replies queued in `scripted` first, by URL)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.log: list[tuple[float, str]] = []
        self.scripted: dict[str, list[Response]] = {}

    async def send(self, request: Request) -> Outcome:
        self.sent[request.url] = self.sent.get(request.url, 0) + 1
        self.log.append((time.time(), request.url))
        await asyncio.sleep(0)
        if "down.test" in request.url:
            return RequestFailure(
                FailureKind.TRANSPORT, "connection refused by down.test:80", host_failed=True
            )
        queued = self.scripted.get(request.url)
        if queued:
            return queued.pop(0)
        return Response(200, {}, '{"status": "RUNNING"}', 1)


Env = tuple[Runtime, FakeApi, DownHttp]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    api, http = FakeApi(), DownHttp()
    config = Config.from_env(
        {
            "JOBWATCH_STATUS_QPS": "1000",
            "JOBWATCH_STATUS_BURST": "1000",
            "JOBWATCH_HOST_BREAKER_FAILURES": "4",
            "JOBWATCH_HOST_BREAKER_COOLDOWN": "10s",
        }
    )
    metrics = Metrics()
    runtime = Runtime(config, api, http, metrics)  # type: ignore[arg-type]
    runtime.start()
    runtime.start_polling()
    yield runtime, api, http
    await runtime.shutdown(1.0)


async def test_an_open_breaker_holds_the_hosts_watches_and_not_the_others(env: Env) -> None:
    runtime, api, http = env
    fast = {"timeout": "1m", "backoff": {"maxInterval": "100ms"}}
    for n in range(3):
        runtime.observe("ADDED", jobwatch(f"d{n}", url=f"http://down.test/{n}", **fast))
    runtime.observe("ADDED", jobwatch("up", url="http://up.test/", **fast))
    await until(
        lambda: all(api.last(f"d{n}").get("reason") == "HostCircuitOpen" for n in range(3)), env
    )
    sent = sum(n for url, n in http.sent.items() if "down.test" in url)
    attempts = [runtime.watches[("ns", f"d{n}")].attempts for n in range(3)]
    status = api.last("d0")
    assert status["phase"] == "Polling"
    assert "circuit breaker of http://down.test:80 is open" in status["message"]
    assert status["lastError"]["class"] == "Transient"  # the last real error stays
    up = http.sent.get("http://up.test/", 0)
    await until(lambda: http.sent.get("http://up.test/", 0) > up + 5, env)
    # Meanwhile nothing went to the host and no attempt was counted.
    assert sum(n for url, n in http.sent.items() if "down.test" in url) == sent
    assert [runtime.watches[("ns", f"d{n}")].attempts for n in range(3)] == attempts
    assert api.last("up")["reason"] == "Polling"
    scraped = runtime._metrics.registry.get_sample_value(
        "jobwatch_host_breaker_state", {"host": "http://down.test:80", "state": "open"}
    )
    assert scraped == 1
    held_polls = runtime._metrics.registry.get_sample_value(
        "jobwatch_host_polls_held_total", {"reason": "HostCircuitOpen"}
    )
    assert held_polls is not None and held_polls >= 3
    assert_invariant(runtime)


async def test_the_in_flight_slot_is_given_back_when_the_request_crashes(env: Env) -> None:
    runtime, api, http = env

    async def crash(request: Request) -> Outcome:
        raise RuntimeError("boom")

    http.send = crash  # type: ignore[method-assign]
    runtime.observe("ADDED", jobwatch("w", url="http://up.test/w"))
    await until(lambda: runtime.watches[("ns", "w")].attempts >= 3, env)
    host = runtime._hosts.get(runtime._hosts.key("ns", "http://up.test/w"))
    assert host is not None
    await until(lambda: host.in_flight == 0, env)
    assert "Internal" in api.error_classes("w")


async def test_retry_after_to_one_watch_holds_all_of_its_host(env: Env) -> None:
    runtime, api, http = env
    spec = {"interval": "200ms", "timeout": "1m", "backoff": {"maxInterval": "5s"}}
    http.scripted["http://up.test/a0"] = [Response(429, {"retry-after": "2"}, "", 1)]
    for n in range(3):
        runtime.observe("ADDED", jobwatch(f"a{n}", url=f"http://up.test/a{n}", **spec))
    runtime.observe("ADDED", jobwatch("b", url="http://other.test/b", **spec))
    await until(lambda: not http.scripted["http://up.test/a0"], env)
    limited = next(at for at, url in http.log if url == "http://up.test/a0")
    held = ("a1", "a2")
    await until(lambda: any(api.last(n).get("reason") == "HostRetryAfter" for n in held), env)
    status = next(api.last(n) for n in held if api.last(n).get("reason") == "HostRetryAfter")
    assert "asked this namespace's JobWatches of it to wait (Retry-After)" in status["message"]
    await until(lambda: http.log[-1][0] > limited + 2.2, env, timeout=5)
    # Past the few requests that went out before the 429 was read:
    to_a = [at for at, url in http.log if "up.test" in url and at > limited + 0.05]
    to_b = [at for at, url in http.log if "other.test" in url and limited < at < limited + 2]
    assert to_a and min(to_a) >= limited + 2 - 0.01  # the whole host waited its 2 s
    assert len(to_b) >= 5  # another host did not


async def test_retry_after_holds_the_host_no_longer_than_the_watch_that_got_it(
    env: Env,
) -> None:
    # The watch's own backoff.maxInterval clamps the wait (docs/api.md, step 4); its
    # neighbours must not wait longer than it does.
    runtime, _, http = env
    spec = {"interval": "200ms", "timeout": "1m", "backoff": {"maxInterval": "1s"}}
    http.scripted["http://up.test/a0"] = [Response(429, {"retry-after": "3600"}, "", 1)]
    for n in range(2):
        runtime.observe("ADDED", jobwatch(f"a{n}", url=f"http://up.test/a{n}", **spec))
    await until(lambda: not http.scripted["http://up.test/a0"], env)
    limited = next(at for at, url in http.log if url == "http://up.test/a0")
    await until(
        lambda: (
            {url for at, url in http.log if at > limited + 0.5}
            >= {"http://up.test/a0", "http://up.test/a1"}
        ),
        env,
        timeout=5,
    )
    resumed = min(at for at, url in http.log if at > limited + 0.05)
    assert limited + 1 - 0.01 <= resumed < limited + 2


async def test_a_poll_its_hosts_limit_delays_is_counted_with_how_long_and_shown() -> None:
    api, http = FakeApi(), DownHttp()
    config = Config.from_env(
        {
            "JOBWATCH_STATUS_QPS": "1000",
            "JOBWATCH_STATUS_BURST": "1000",
            "JOBWATCH_HOST_LIMITS": "up.test:80=0/1",
        }
    )
    metrics = Metrics()
    runtime = Runtime(config, api, http, metrics)  # type: ignore[arg-type]
    answer = http.send

    async def slow(request: Request) -> Outcome:
        await asyncio.sleep(0.2)
        return await answer(request)

    http.send = slow  # type: ignore[method-assign]
    runtime.start()
    runtime.start_polling()
    try:
        spec = {"interval": "200ms", "timeout": "1m"}
        for n in range(3):
            runtime.observe("ADDED", jobwatch(f"w{n}", url=f"http://up.test/{n}", **spec))
        labels = {"host": "http://up.test:80"}

        def delayed() -> float:
            return (
                metrics.registry.get_sample_value("jobwatch_host_polls_delayed_total", labels) or 0
            )

        await until(lambda: delayed() >= 6, timeout=10)
        seconds = metrics.registry.get_sample_value(
            "jobwatch_host_poll_delay_seconds_total", labels
        )
        # Each waited for another's request of 0.2 s to end, and went as soon as it did:
        # not after its hold's own time (RECHECK_SECONDS at least).
        assert seconds is not None
        assert 0.05 < seconds / delayed() < RECHECK_SECONDS
        # Held longer than its interval: the watch says so.
        messages = [
            s["message"]
            for n in range(3)
            for s in api.statuses.get(f"w{n}", [])
            if s.get("reason") == "HostRateLimited"
        ]
        assert messages and "in flight to http://up.test:80" in messages[0]
        assert "at its limit of 1 (fixed)" in messages[0]
        assert_invariant(runtime)
    finally:
        await runtime.shutdown(1.0)


async def test_a_poll_waiting_for_a_slot_goes_when_one_frees_unless_planned_anew() -> None:
    api, gate = FakeApi(), asyncio.Event()
    log: list[tuple[float, str]] = []

    class GatedHttp:
        async def send(self, request: Request) -> Outcome:
            log.append((time.monotonic(), request.url))
            if request.url.endswith("/slow") and not gate.is_set():
                await gate.wait()
            return Response(200, {}, '{"status": "RUNNING"}', 1)

    config = Config.from_env(
        {
            "JOBWATCH_STATUS_QPS": "1000",
            "JOBWATCH_STATUS_BURST": "1000",
            "JOBWATCH_HOST_LIMITS": "up.test:80=0/1",
        }
    )
    runtime = Runtime(config, api, GatedHttp(), Metrics())  # type: ignore[arg-type]
    runtime.start()
    runtime.start_polling()
    try:
        # An interval shorter than the wait: the watches say they wait (HostRateLimited).
        spec = {"interval": "200ms", "timeout": "1m"}
        runtime.observe("ADDED", jobwatch("slow", url="http://up.test/slow", **spec))
        await until(lambda: len(log) == 1)  # its request holds the host's one slot
        waiting = {n: jobwatch(n, url=f"http://up.test/{n}", **spec) for n in ("a", "b")}
        for body in waiting.values():
            runtime.observe("ADDED", body)
        await until(lambda: {"a", "b"} <= {s["name"] for s in held_by_limit(api)})
        # b is suspended while it waits: its poll is planned anew, for its deadline.
        body = waiting["b"]
        body = {**body, "metadata": {**body["metadata"], "generation": 2}}
        runtime.observe("MODIFIED", {**body, "spec": {**body["spec"], "suspend": True}})
        freed = time.monotonic()
        gate.set()
        await until(lambda: any(url.endswith("/a") for _, url in log))
        went = next(at for at, url in log if url.endswith("/a"))
        assert went - freed < RECHECK_SECONDS  # at once, not at its hold's own time
        # a polls every 200 ms: six polls outlast any hold b had (at most 2 x RECHECK).
        await until(lambda: sum(url.endswith("/a") for _, url in log) >= 6, timeout=10)
        assert not any(url.endswith("/b") for _, url in log)
        assert_invariant(runtime)
    finally:
        await runtime.shutdown(1.0)


def held_by_limit(api: FakeApi) -> list[dict[str, Any]]:
    return [
        {"name": name, **status}
        for name, statuses in api.statuses.items()
        for status in statuses
        if status.get("reason") == "HostRateLimited"
    ]
