"""Watches moving between replicas (handover.py): a handover cuts the request still out
and hands on since when; the taker waits for a request the previous holder may still
have open; a bucket given up before its watches were taken in hands on their timing.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from runtime_fakes import (
    FakeApi,
    FakeHttp,
    Slow,
    jobwatch,
    replica,
)

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.kits.metrics import Metrics


async def test_a_handover_cuts_the_request_still_out_and_hands_since_when() -> None:
    # The handover waits only so long for polls in flight. A request still out then is
    # cut (its socket closed): left open, the job service would be working on it while
    # the next holder's first request arrives. Its start goes with the handover.
    http = Slow()
    async with replica(http) as runtime:
        ownership = runtime._ownership
        assert ownership is not None
        runtime.observe("ADDED", jobwatch("w"))
        await asyncio.wait_for(http.out.wait(), 5)
        sent = runtime.watches[("ns", "w")].last_poll_time
        ownership.releasing(0)
        started = time.time()
        handed = await runtime.hand_over(frozenset({0}), budget=0.05)
        assert http.cut == 1
        timing = handed[("ns", "w")]
        assert timing.in_flight_since == sent
        assert timing.last_end is not None and timing.last_end >= started


def taker(identity: str) -> tuple[Runtime, Ownership]:
    """A runtime of a one-bucket group, `identity`, before it takes the bucket."""
    ownership = Ownership(LeaseSettings("ops", identity, buckets=1), scopes=[None])
    config = Config.from_env({})
    runtime = Runtime(config, FakeApi(), FakeHttp(), Metrics(), ownership=ownership)  # type: ignore[arg-type]
    return runtime, ownership


async def test_the_taker_waits_for_a_request_the_previous_holder_may_still_have_open() -> None:
    runtime, ownership = taker("r1")
    now = time.time()
    handed = {("ns", "cut"): Handed(now - 0.5, now + 1, 3, in_flight_since=now - 0.5)}
    ownership.take(0, time.monotonic() + 60, handed, vanished=None)
    ownership.listing(None)
    for name in ("cut", "new"):
        runtime.observe("ADDED", jobwatch(name, requestTimeout="2s", interval="1s"))
    # A cut request may run at the job service up to its request timeout.
    assert runtime.watches[("ns", "cut")].next_poll_time == pytest.approx(now + 1.5, 0.01)
    assert runtime.watches[("ns", "new")].next_poll_time == pytest.approx(now, abs=0.5)
    # A holder that vanished (kill -9, a freeze) may have left any request open.
    runtime, ownership = taker("r2")
    ownership.take(0, time.monotonic() + 60, {}, vanished=now - 1.0)
    ownership.listing(None)
    runtime.observe("ADDED", jobwatch("w", requestTimeout="2s", interval="1s"))
    assert runtime.watches[("ns", "w")].next_poll_time == pytest.approx(now + 1.0, 0.01)


async def test_a_bucket_given_up_before_its_watches_were_taken_in_hands_on_their_timing() -> None:
    # A rolling update moves a bucket twice within seconds: the replica that took it may
    # give it up again before it has read all its JobWatches. What the holder before it
    # handed over for them must reach the next holder (their status progress is minutes
    # old in a large fleet: polled at once from it, the job sees a second request early).
    # Likewise the time by which a vanished holder stopped, for watches not read yet.
    runtime, ownership = taker("r1")
    now = time.time()
    early = Handed(now - 5.0, now + 50.0, 2)
    ownership.take(0, time.monotonic() + 60, {("ns", "early"): early}, vanished=now - 3.0)
    ownership.listing(None)
    assert runtime.adoption is not None
    for name in ("early", "seen"):
        runtime.adoption.note("ADDED", ("ns", name), jobwatch(name))
    ownership.releasing(0)
    handed = await runtime.hand_over(frozenset({0}), budget=0.05)
    assert handed[("ns", "early")] == early
    seen = handed[("ns", "seen")]
    assert seen.last_end == seen.in_flight_since == now - 3.0
    # A watch taken in with a request the holder before may still have open passes its
    # start on too, until that request's time is up.
    ownership.take(0, time.monotonic() + 60, {("ns", "cut"): Handed(now - 1, now + 50, 1, now - 1)})
    ownership.listing(None)
    runtime.observe("ADDED", jobwatch("cut", requestTimeout="30s"))
    assert ("ns", "cut") in runtime.watches
    ownership.releasing(0)
    handed = await runtime.hand_over(frozenset({0}), budget=0.05)
    assert handed[("ns", "cut")].in_flight_since == pytest.approx(now - 1, abs=0.01)
