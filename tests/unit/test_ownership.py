"""Ownership: when a bucket taken is usable, how long its validity lasts, and the requests
in flight its end cuts."""

from __future__ import annotations

import asyncio
import contextlib
import time

from lease_fakes import Clock

from jobwatch.control.sharding.leases import LeaseSettings, bucket_of
from jobwatch.control.sharding.ownership import Ownership

BUCKETS = 32


def test_a_bucket_is_usable_only_after_a_list_that_follows_its_taking() -> None:
    settings = LeaseSettings(namespace="ops", identity="a", buckets=BUCKETS)
    ownership = Ownership(settings, scopes=("team-a", "team-b"), clock=lambda: 0.0)
    bucket = bucket_of("team-a", "w", BUCKETS)
    ownership.listing("team-a")
    ownership.take(bucket, valid_until=100.0, handed={})
    assert not ownership.owns("team-a", "w")  # the stream may still carry older events
    ownership.listing("team-b")
    assert not ownership.owns("team-a", "w")
    ownership.listing("team-a")
    assert ownership.owns("team-a", "w")
    assert ownership.valid("team-a", "w", 99.0)
    assert not ownership.valid("team-a", "w", 100.0)  # past its renew deadline
    ownership.releasing(bucket)
    assert not ownership.owns("team-a", "w")
    assert ownership.writable("team-a", "w", 99.0)
    assert not ownership.writable("team-a", "w", 100.0)  # in time, not only membership
    ownership.give_up(bucket)
    assert not ownership.writable("team-a", "w", 99.0)


async def test_requests_in_flight_are_cut_when_the_validity_ends_not_before() -> None:
    settings = LeaseSettings(namespace="ops", identity="a")
    ownership = Ownership(settings, scopes=(None,))
    bucket = bucket_of("team", "w", BUCKETS)
    start = time.monotonic()
    ownership.take(bucket, valid_until=start + 0.2, handed={})

    async def request(renew_to: float | None) -> float:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None) as hold:
                guarded = ownership.guard("team", "w", hold)
                try:
                    if renew_to is not None:
                        ownership.renewed(bucket, start + renew_to)
                    await asyncio.sleep(5)
                finally:
                    ownership.unguard(guarded, hold)
        return time.monotonic() - start

    assert 0.2 <= await request(None) < 0.6
    ownership.renewed(bucket, start + 0.4)  # renewed in time: the request goes on
    ownership.take(bucket, valid_until=time.monotonic() + 0.1, handed={})
    start = time.monotonic()
    assert 0.3 <= await request(0.3) < 0.7
    # A handover cuts at once.
    ownership.take(bucket, valid_until=time.monotonic() + 10, handed={})
    start = time.monotonic()
    task = asyncio.ensure_future(request(None))
    await asyncio.sleep(0.05)
    ownership.cut(frozenset({bucket}))
    assert await task < 0.3


def test_a_renewal_answered_after_the_validity_ended_does_not_revive_the_bucket() -> None:
    # Polls skipped in between have no plan: the bucket is parked, then resumed (which
    # plans them), never silently valid again.
    clock = Clock()
    ownership = Ownership(LeaseSettings("ops", "a", buckets=BUCKETS), scopes=(None,), clock=clock)
    bucket = bucket_of("team", "w", BUCKETS)
    ownership.take(bucket, valid_until=clock.now + 3, handed={})
    clock.now += 3.5
    assert ownership.kept("team", "w", clock.now)  # lapsed: kept for a resume
    ownership.renewed(bucket, valid_until=clock.now + 2.5)
    assert not ownership.valid("team", "w", clock.now)
    ownership.park(bucket, transitions=0)
    assert ownership.kept("team", "w", clock.now)
    ownership.resume(bucket, valid_until=clock.now + 3)
    assert ownership.valid("team", "w", clock.now)
