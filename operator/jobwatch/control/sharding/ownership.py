"""Which watches this replica may take in, poll and write (layer: control, sharding):
the buckets it holds, as the elector took, renewed, parked and gave them up, and the
requests in flight that a bucket's end cuts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping

from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.leases import LeaseSettings, bucket_of


class Ownership:
    """Which watches this replica may take in, poll and write, asked per event, per poll
    and per write.

    A bucket taken becomes usable for a scope of the informer (a namespace, or all) only
    once that scope has started a fresh list after the taking: events of the stream
    before it could be older than the last status the previous holder wrote, and a
    watch adopted from them would repeat attempts, or poll sooner than its timing floor.

    Polls and writes are bounded by the bucket's validity (renew deadline after the last
    renewal sent), in time, not only in membership: a request still open when it ends is
    cut, its socket closed (`guard`), whatever stage it is in (DNS, connecting, waiting
    for the answer), and no status or Event is sent after it (`writable`). A bucket that
    lapsed that way is parked: its watches stay in memory, unpolled, and come back as
    they were if the same replica takes it again with no other holder in between.
    """

    def __init__(
        self,
        settings: LeaseSettings,
        scopes: Iterable[str | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._buckets = settings.buckets
        self._clock = clock
        self._per_namespace = None not in scopes
        self._valid_until: dict[int, float] = {}  # held and releasing buckets (monotonic)
        self._releasing: set[int] = set()  # given up, their last status still to write
        self._parked: dict[int, int] = {}  # lapsed -> their Lease's transitions then
        self._taken_at: dict[int, int] = {}  # bucket -> sequence number of its taking
        self._listed_at: dict[str | None, int] = {}  # scope -> sequence at its last list
        self._sequence = 0
        self._handed: dict[tuple[str, str], Handed] = {}  # from the Leases taken
        # Buckets taken after their holder vanished (no release): the wall time by
        # which it had stopped sending, as seen here.
        self._vanished: dict[int, float] = {}
        self._open: dict[int, set[asyncio.Timeout]] = {}  # requests in flight, per bucket
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def bucket(self, namespace: str, name: str) -> int:
        return bucket_of(namespace, name, self._buckets)

    @property
    def held(self) -> frozenset[int]:
        return frozenset(b for b in self._valid_until if b not in self._releasing)

    @property
    def parked(self) -> frozenset[int]:
        return frozenset(self._parked)

    def owns(self, namespace: str, name: str) -> bool:
        """May an event of this object be taken in?"""
        bucket = bucket_of(namespace, name, self._buckets)
        taken = self._taken_at.get(bucket)
        if taken is None:
            return False
        scope = namespace if self._per_namespace else None
        return self._listed_at.get(scope, -1) >= taken

    def valid(self, namespace: str, name: str, now: float) -> bool:
        """May this watch, taken in already, be polled now (`now`: the loop's monotonic
        clock)? (What is taken in is decided by `owns` and adoption.py.)"""
        return self.valid_at(bucket_of(namespace, name, self._buckets), now)

    def valid_at(self, bucket: int, now: float) -> bool:
        return bucket not in self._releasing and now < self._valid_until.get(bucket, -math.inf)

    def writable(self, namespace: str, name: str, now: float) -> bool:
        """May this watch's status (or an Event about it) be sent now: its bucket held or
        being handed over, and within its validity."""
        bucket = bucket_of(namespace, name, self._buckets)
        return now < self._valid_until.get(bucket, -math.inf)

    def kept(self, namespace: str, name: str, now: float) -> bool:
        """Parked, or held but lapsed (parked at the elector's next round): not to be
        polled now, but not to be forgotten either (`Handover.resume` plans it again)."""
        bucket = bucket_of(namespace, name, self._buckets)
        return bucket in self._parked or (
            bucket not in self._releasing and now >= self._valid_until.get(bucket, math.inf)
        )

    def listing(self, scope: str | None) -> None:
        """The informer starts a list of `scope` (its stream is closed)."""
        self._listed_at[scope] = self._sequence

    def take(
        self,
        bucket: int,
        valid_until: float,
        handed: Mapping[tuple[str, str], Handed],
        vanished: float | None = None,
    ) -> None:
        self._parked.pop(bucket, None)
        self._sequence += 1
        self._taken_at[bucket] = self._sequence
        self._valid_until[bucket] = valid_until
        self._handed.update(handed)
        if vanished is not None:
            self._vanished[bucket] = vanished

    def adopted(self, bucket: int) -> None:
        """Every object of `bucket` was read after its taking (adoption.py): its events
        are taken in from here on, with no list needed."""
        if bucket in self._taken_at:
            self._taken_at[bucket] = -1

    def resume(self, bucket: int, valid_until: float) -> None:
        """A parked bucket taken again with no other holder since: as it was."""
        del self._parked[bucket]
        self._valid_until[bucket] = valid_until

    def park(self, bucket: int, transitions: int) -> None:
        """Lapsed (not renewed in time): no poll, no write, requests in flight cut."""
        self._valid_until.pop(bucket, None)
        self._parked[bucket] = transitions
        self.cut(frozenset({bucket}))

    def parked_at(self, bucket: int) -> int | None:
        """The Lease's transitions when `bucket` was parked (None: not parked)."""
        return self._parked.get(bucket)

    def expect(self, handed: Mapping[tuple[str, str], Handed]) -> None:
        """Handovers for watches of buckets not taken yet (see `Elector._take`)."""
        self._handed.update(handed)

    def handed(self, namespace: str, name: str) -> Handed | None:
        """What the previous holder left for this watch (once: adopting consumes it)."""
        return self._handed.pop((namespace, name), None)

    def unadopted(self, buckets: frozenset[int]) -> dict[tuple[str, str], Handed]:
        """What the previous holders of `buckets` left for watches not taken in yet."""
        return {k: h for k, h in self._handed.items() if self.bucket(*k) in buckets}

    def vanished(self, namespace: str, name: str) -> float | None:
        """When this watch's previous holder stopped at the latest, if it vanished
        without a handover (wall clock): it may have left a request open until then."""
        return self._vanished.get(bucket_of(namespace, name, self._buckets))

    def renewed(self, bucket: int, valid_until: float) -> None:
        # A renewal answered after the validity ended does not revive the bucket: polls
        # skipped meanwhile have no plan; it is parked, then resumed, which plans them.
        until = self._valid_until.get(bucket)
        if until is not None and self._clock() < until:
            self._valid_until[bucket] = max(until, valid_until)

    def releasing(self, bucket: int) -> None:
        """Handing it over: no event taken in, no poll sent, the last status written."""
        if bucket in self._valid_until:
            self._releasing.add(bucket)
        self._taken_at.pop(bucket, None)

    def give_up(self, bucket: int) -> None:
        self._valid_until.pop(bucket, None)
        self._taken_at.pop(bucket, None)
        self._releasing.discard(bucket)
        self._parked.pop(bucket, None)
        self._vanished.pop(bucket, None)
        self.cut(frozenset({bucket}))
        for key in [k for k in self._handed if self.bucket(*k) == bucket]:
            del self._handed[key]  # never adopted: its object is gone

    # --- requests in flight ----------------------------------------------

    def guard(self, namespace: str, name: str, request: asyncio.Timeout) -> int:
        """Cuts `request` (an entered `asyncio.timeout(None)` around it) the moment its
        bucket's validity ends; returns the bucket, for `unguard`."""
        bucket = bucket_of(namespace, name, self._buckets)
        self._open.setdefault(bucket, set()).add(request)
        if bucket not in self._timers:
            self._arm(bucket)
        return bucket

    def unguard(self, bucket: int, request: asyncio.Timeout) -> None:
        requests = self._open.get(bucket)
        if requests is not None:
            requests.discard(request)
            if not requests:
                del self._open[bucket]
                timer = self._timers.pop(bucket, None)
                if timer is not None:
                    timer.cancel()

    def cut(self, buckets: frozenset[int]) -> None:
        """Ends the requests in flight of `buckets` now (their sockets are closed)."""
        for bucket in buckets:
            timer = self._timers.pop(bucket, None)
            if timer is not None:
                timer.cancel()
            for request in self._open.pop(bucket, ()):
                if not request.expired():
                    request.reschedule(0)  # in the past: at the next turn of the loop

    def _arm(self, bucket: int) -> None:
        left = self._valid_until.get(bucket, -math.inf) - self._clock()
        if left <= 0:
            self.cut(frozenset({bucket}))
            return
        loop = asyncio.get_running_loop()
        self._timers[bucket] = loop.call_later(left, self._lapse, bucket)

    def _lapse(self, bucket: int) -> None:
        """The validity `bucket` had when its timer was set has ended: renewed since, the
        timer is set again; else its requests are cut."""
        del self._timers[bucket]
        if self._open.get(bucket):
            self._arm(bucket)
