"""The lease elector (layer: control, sharding).

Replicas that share the fleet: B buckets, each owned through a `coordination.k8s.io`
Lease, and a member Lease per replica so that each can tell its fair share.

A JobWatch belongs to bucket `crc32(namespace/name) % B`. A replica polls only the
watches of the buckets it holds. Every `retry_period` it lists the group's Leases (one
request), renews its own (one update each, each on its own: one that fails costs only
its bucket) and then, knowing the live replicas:

- takes free buckets while it holds fewer than its share, ceil(B / live replicas), and
  any bucket that stayed free for ORPHAN_ROUNDS rounds whatever its share (so none
  stays unowned while replicas are missing), and at once any the Leases say it holds;
- gives one bucket back per round while it holds more than its share and another live
  replica holds less than the floor of it (a replica that joins gets its share within a
  few rounds, and a rebalance never moves more than it must).

The timing is client-go's (`tools/leaderelection`): a Lease is free when released
(no holder) or when its record has not changed for `leaseDurationSeconds` as seen on
this replica's own clock; so no one needs synchronised clocks. A holder counts a bucket
as its own only until `renew_deadline` after it sent the last renewal that succeeded:
as others wait a whole `lease_duration` after they saw that renewal, a holder that
cannot renew (an API server away, a process stopped with SIGSTOP) has stopped polling
and writing for the bucket before anyone else may take it; its requests still open
then are cut (`Ownership.guard`). Updates carry the resourceVersion they read, so two
replicas taking one bucket at once cannot both succeed. Each Lease request is bounded
and retried within the renew deadline (REQUEST_SHARE, RETRY_SHARE).

Giving a bucket up (a rebalance, SIGTERM) stops its polls, waits for those in flight,
cuts those still open, writes their last status and only then releases the Lease (no
holder, duration 1 s, as client-go's ReleaseOnCancel does), with each watch's timing
for the next holder (HANDOVER_ANNOTATION), so the next holder adopts within seconds, not
after an expiry. Taking one adopts its watches from reads made after the taking
(adoption.py). The settings that decide ownership are on every Lease
(AGREEMENT_ANNOTATION): a replica whose settings are not those in force takes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from jobwatch.control.sharding.handed import Handed, decode_handover
from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.sharding.plan import (
    Plan,
    disagreement,
    foreign_handovers,
    in_force,
    plan,
    until_expiry,
)
from jobwatch.control.sharding.store import LeaseBook, LeaseStore, why_failed
from jobwatch.kits.metrics import LeaseFigures

log = logging.getLogger(__name__)

# A round that waits for a Lease to expire comes this long after the moment.
EXPIRY_MARGIN = 0.05


class Handover(Protocol):
    """What the elector asks of the runtime."""

    def adopt(self, buckets: frozenset[int]) -> None:
        """Buckets were taken: take in their watches, from reads made after the taking."""

    def resume(self, buckets: frozenset[int]) -> None:
        """Parked buckets were taken again with no other holder between: poll their
        watches again, as they were."""

    def drop(self, buckets: frozenset[int]) -> None:
        """Buckets were lost: forget their watches now, write nothing more for them."""

    async def hand_over(
        self, buckets: frozenset[int], budget: float
    ) -> Mapping[tuple[str, str], Handed]:
        """Buckets are given up: stop their polls, wait for those in flight, write their
        phase and reason changes, within `budget` seconds, and cut the requests still
        open; then the timing of each of their watches, which goes to the next holder
        with the Lease."""


class Elector:
    """Runs the rounds; `run` until cancelled, then `release` on the way out."""

    def __init__(
        self,
        settings: LeaseSettings,
        store: LeaseStore,
        ownership: Ownership,
        handover: Handover,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._ownership, self._handover = ownership, handover
        self._clock, self._wall, self._sleep = clock, wall, sleep
        self._leases = LeaseBook(settings, store, clock=clock, wall=wall, sleep=sleep)
        self._rand = rand or random.Random()
        self._rounds = 0
        # The last round failed: what the listing shows did not change because nobody
        # could write it, not because its holder died (see `round`).
        self._blind = False
        self.last_plan: Plan | None = None
        # Why this replica takes no bucket: its settings differ from those in force.
        self.disagreement: str | None = None
        # Set once the first round that may take buckets has ended, well or not.
        self.first_takes = asyncio.Event()

    def figures(self) -> LeaseFigures:
        last = self.last_plan
        return LeaseFigures(
            held=self._ownership.held,
            live=last.live if last is not None else 1,
            share=last.share if last is not None else self._settings.buckets,
        )

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as exc:
                # The API server away or refusing: what is held stays held until its
                # renew deadline (checked below), and is then parked.
                self._blind = True
                log.warning("lease round failed (%s)", why_failed(exc))
            if self._rounds >= 2:
                self.first_takes.set()
            self._expire_unrenewed()
            period = self._settings.retry_period * (0.9 + 0.2 * self._rand.random())
            until = until_expiry(self._leases.seen, self._settings.identity, self._clock())
            await self._sleep(min(period, until + EXPIRY_MARGIN))

    async def round(self) -> None:
        settings = self._settings
        self._rounds += 1
        listed = await self._leases.list_group()
        now = self._clock()
        if self._blind:
            # After an outage every Lease looks unchanged for as long as it lasted: its
            # holder counts as alive until it has had a lease duration to renew. (A
            # replica takes its own buckets back at once: see `plan`.)
            self._leases.forget()
            self._blind = False
        self._leases.observe(listed, now)
        try:
            await self._leases.renew_member()
        except Exception as exc:  # its buckets' own renewals are what keep them
            log.warning("could not renew member lease (%s)", why_failed(exc))
        self._forget_taken()
        await self._renew_held()
        # The first round only announces this replica: taking before the others are
        # known would grab every bucket and then give most of them back.
        if self._rounds == 1:
            return
        if self._disagrees(self._clock()):
            if self._ownership.held:
                await self._give(self._ownership.held)
            return
        current = plan(
            settings,
            seen=self._leases.seen,
            absent=self._leases.absent,
            held=self._ownership.held,
            now=self._clock(),
            rand=self._rand,
        )
        self.last_plan = current
        await self._take_all(current)
        if current.give:
            await self._give(frozenset(current.give))
        await self._leases.collect_garbage()

    async def release(self, budget: float) -> None:
        """On the way out: hand every bucket over and leave the group."""
        held = self._ownership.held
        if held:
            await self._give(held, budget)
        try:
            await self._leases.leave()
        except Exception as exc:
            log.warning("could not delete member lease (%s)", exc)

    def _disagrees(self, now: float) -> bool:
        """Whether the settings in force in the group (see `in_force`) are not this
        replica's. If so it takes nothing and gives back what it holds, and says why
        (`disagreement`)."""
        found = in_force(self._leases.seen, now)
        if found is None or found[0] == self._settings.agreement:
            self.disagreement = None
            return False
        text, holder = found
        message = disagreement(self._settings, holder, text)
        if message != self.disagreement:
            log.error("%s", message)
        self.disagreement = message
        return True

    def _forget_taken(self) -> None:
        """Held or parked buckets whose Lease another replica holds now (or nobody, or
        deleted): lost; their watches are dropped, the new holder adopts them."""
        settings = self._settings
        ownership = self._ownership
        lost = {
            bucket
            for bucket in ownership.held | ownership.parked
            if (lease := self._leases.seen.get(settings.bucket_lease(bucket))) is None
            or lease.holder != settings.identity
        }
        if lost:
            self._lose(frozenset(lost), "taken by another replica")

    async def _renew_held(self) -> None:
        # At once, and each on its own: a round must end well within the renew deadline
        # however many buckets this replica holds, and one that fails costs only its own
        # bucket (it lapses at its renew deadline unless a later round renews it).
        # Each renewal counts the moment it is answered, not once the slowest is.
        await asyncio.gather(*(self._renew(bucket) for bucket in sorted(self._ownership.held)))

    async def _renew(self, bucket: int) -> None:
        try:
            valid_until = await self._leases.hold(bucket)
        except Exception as exc:
            log.warning("could not renew bucket %d (%s)", bucket, why_failed(exc))
            return
        if valid_until is not None:  # None: written meanwhile (409); the next listing says
            self._ownership.renewed(bucket, valid_until)

    async def _take_all(self, current: Plan) -> None:
        """Tries each bucket of the plan on its own: each one won is adopted (or resumed,
        if parked here and nobody held it since) as soon as it is won, whatever happens
        to the others (one slow taking must not hold the others' watches back)."""
        if current.take:
            self._ownership.expect(foreign_handovers(self._leases.seen, self._settings.agreement))
        results = await asyncio.gather(
            *(self._take(bucket) for bucket in current.take), return_exceptions=True
        )
        taken: set[int] = set()
        resumed: set[int] = set()
        for bucket, result in zip(current.take, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.warning("could not take bucket %d (%s)", bucket, why_failed(result))
            elif result == "resumed":
                resumed.add(bucket)
            elif result == "taken":
                taken.add(bucket)
        if taken or resumed:
            log.info(
                "took buckets %s (share %d of %d replicas)",
                sorted(taken | resumed),
                current.share,
                current.live,
            )

    async def _take(self, bucket: int) -> str | None:
        """ "taken", "resumed" (parked here, nobody held it since), or None (another
        replica was first)."""
        settings = self._settings
        before = self._leases.seen.get(settings.bucket_lease(bucket))
        handed = decode_handover(before.body if before is not None else {})
        parked = self._ownership.parked_at(bucket)
        same_term = (
            parked is not None
            and before is not None
            and before.holder == settings.identity
            and before.transitions == parked
        )
        vanished = None
        if before is not None and before.holder not in ("", settings.identity):
            # It expired: its holder stopped sending by its renew deadline after the
            # renewal seen last, at the latest (converted to the wall clock).
            since_wall = self._wall() - (self._clock() - before.since)
            vanished = since_wall + settings.renew_deadline
        valid_until = await self._leases.hold(bucket)
        if valid_until is None:
            return None
        if same_term:
            self._ownership.resume(bucket, valid_until)
            self._handover.resume(frozenset({bucket}))
            return "resumed"
        if parked is not None:
            self._lose(frozenset({bucket}), "held by another replica meanwhile")
        self._ownership.take(bucket, valid_until, handed, vanished)
        self._handover.adopt(frozenset({bucket}))
        return "taken"

    async def _give(self, buckets: frozenset[int], budget: float | None = None) -> None:
        settings = self._settings
        budget = settings.renew_deadline / 2 if budget is None else budget
        for bucket in buckets:
            self._ownership.releasing(bucket)
        handed: Mapping[tuple[str, str], Handed] = {}
        try:
            handed = await self._handover.hand_over(buckets, budget)
        finally:
            for bucket in buckets:
                self._ownership.give_up(bucket)
        by_bucket: dict[int, dict[tuple[str, str], Handed]] = {b: {} for b in buckets}
        for key, timing in handed.items():
            by_bucket[self._ownership.bucket(*key)][key] = timing
        await asyncio.gather(*(self._leases.release(b, by_bucket[b]) for b in sorted(buckets)))
        log.info("gave buckets %s back", sorted(buckets))

    def _expire_unrenewed(self) -> None:
        """Held buckets past their validity are parked (see `Ownership`)."""
        now = self._clock()
        lapsed = sorted(
            bucket for bucket in self._ownership.held if not self._ownership.valid_at(bucket, now)
        )
        if lapsed:
            log.warning("lost buckets %s: not renewed within the renew deadline", lapsed)
        for bucket in lapsed:
            lease = self._leases.seen.get(self._settings.bucket_lease(bucket))
            self._ownership.park(bucket, lease.transitions if lease is not None else -1)

    def _lose(self, buckets: frozenset[int], why: str) -> None:
        log.warning("lost buckets %s: %s", sorted(buckets), why)
        for bucket in buckets:
            self._ownership.give_up(bucket)
        self._handover.drop(buckets)
