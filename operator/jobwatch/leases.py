"""Replicas that share the fleet: B buckets, each owned through a `coordination.k8s.io`
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
import datetime
import json
import logging
import math
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .kubeerrors import ApiError, Unreachable
from .metrics import LeaseFigures

T = TypeVar("T")

log = logging.getLogger(__name__)

GROUP_LABEL = "jobwatch.dev/lease-group"
ROLE_LABEL = "jobwatch.dev/lease-role"
BUCKET, MEMBER = "bucket", "member"
# Buckets given back per round while holding more than the share: one keeps a
# rebalance gentle (each handover costs a status flush and a list on the taker).
RELEASES_PER_ROUND = 1
# A bucket free for this many retry periods is taken by anyone, beyond its share too:
# replicas short of their share would have taken it by then (a replica that died, or
# the member Leases of those that did, still count in the shares for a lease duration).
ORPHAN_ROUNDS = 3
# Member Leases of replicas gone this many lease durations are deleted by anyone.
MEMBER_GARBAGE_DURATIONS = 20
# A round that waits for a Lease to expire comes this long after the moment.
EXPIRY_MARGIN = 0.05
# On a released bucket Lease: when each of its watches last polled and was to poll next,
# and its attempts, for the next holder (see `Handover.hand_over`).
HANDOVER_ANNOTATION = "jobwatch.dev/handover"
# Annotations of an object may take 256 KiB in all; beyond this the handover is left
# out and the next holder resumes from status alone (more buckets keep it small: about
# 40 bytes per watch, so 4,000 watches a bucket).
MAX_HANDOVER_BYTES = 160_000
# On every Lease this replica writes: the settings that decide which replica owns a
# JobWatch. Replicas that disagree on them would poll some JobWatches twice and some not
# at all, so a replica that meets another value than the one in force takes nothing.
AGREEMENT_ANNOTATION = "jobwatch.dev/agreement"
# Each attempt of a Lease request may take this share of the renew deadline, and a
# failed one (no answer, 429, 5xx) is tried again while within RETRY_SHARE of it: one
# stalled connection then costs a retry, not the bucket. (A quarter cut answers a busy
# API server was about to give: its renewals then failed more often than they waited.)
REQUEST_SHARE = 1 / 2
RETRY_SHARE = 3 / 4
RETRY_PAUSE_SHARE = 1 / 20


def bucket_of(namespace: str, name: str, buckets: int) -> int:
    """The bucket of a JobWatch: stable across processes and Python versions."""
    return zlib.crc32(f"{namespace}/{name}".encode()) % buckets


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    namespace: str  # where the Leases live: the operator's own namespace
    identity: str  # this replica, unique: pod name and a random suffix
    group: str = "jobwatch"  # Lease name prefix; one per operator Deployment
    buckets: int = 32
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    # The other settings replicas must agree on besides `buckets` (env name, value).
    scope: tuple[tuple[str, str], ...] = ()

    @property
    def agreement(self) -> str:
        """What `AGREEMENT_ANNOTATION` says for this replica."""
        return json.dumps(
            {"JOBWATCH_BUCKETS": str(self.buckets), **dict(self.scope)}, sort_keys=True
        )

    def bucket_lease(self, bucket: int) -> str:
        return f"{self.group}-bucket-{bucket:03d}"

    @property
    def member_lease(self) -> str:
        return f"{self.group}-member-{_dns_label(self.identity)}"[:253]


class LeaseStore(Protocol):
    """The few Lease requests the elector makes (kube.KubeApi implements them). Errors
    the API server answers are `ApiError`s; 409 means someone else wrote first."""

    async def list_leases(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def replace_lease(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    async def delete_lease(self, namespace: str, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Handed:
    """A watch's timing as its previous holder left it: epoch seconds of the end of its
    last request and of its next planned poll, and its attempts. Newer than its status,
    whose progress is written only every progress interval."""

    last_end: float | None
    next_poll: float | None
    attempts: int
    # A request the previous holder cut at the handover (its socket closed): when it
    # was sent. The job service may still be working on it, up to the request timeout.
    in_flight_since: float | None = None


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


@dataclass(slots=True)
class _Seen:
    """A Lease as last listed, and since when (this replica's clock) it is unchanged."""

    name: str
    role: str
    holder: str
    duration: float
    version: str
    since: float
    body: dict[str, Any] = field(repr=False)
    transitions: int = 0
    agreement: str | None = None  # AGREEMENT_ANNOTATION; None from older versions

    def expired(self, now: float) -> bool:
        return not self.holder or now - self.since >= self.duration

    def free_since(self, now: float) -> float | None:
        """Since when nobody holds it: released, or expired (None while held)."""
        if not self.holder:
            return self.since
        if now - self.since >= self.duration:
            return self.since + self.duration
        return None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round does about the buckets (besides renewing those held)."""

    take: tuple[int, ...]
    give: tuple[int, ...]
    share: int
    live: int


def plan(
    settings: LeaseSettings,
    *,
    seen: Mapping[str, _Seen],
    absent: Mapping[int, float],
    held: frozenset[int],
    now: float,
    rand: random.Random,
) -> Plan:
    """The buckets to try to take and to give back: pure, from one listing. `absent`:
    buckets without a Lease yet, and since when this replica has seen them so."""
    me = settings.identity
    mine = settings.agreement
    members = {
        lease.holder
        for lease in seen.values()
        if lease.role == MEMBER
        and lease.holder
        and not lease.expired(now)
        # One that disagrees takes nothing: sharing with it would leave buckets unheld.
        and lease.agreement in (None, mine)
    }
    members.add(me)
    live = len(members)
    share = math.ceil(settings.buckets / live)
    floor = settings.buckets // live
    counts = dict.fromkeys(members, 0)
    free: list[tuple[int, float]] = []
    ours: list[int] = []
    for bucket in range(settings.buckets):
        lease = seen.get(settings.bucket_lease(bucket))
        if lease is None:
            free.append((bucket, absent.get(bucket, now)))
            continue
        if lease.holder == me and bucket not in held:
            # Ours on record but not in use (parked after an outage, or a taking whose
            # answer was lost): nobody else may take it before it expires, so it is
            # taken back whatever the share (a rebalance gives back any excess).
            ours.append(bucket)
            continue
        since = lease.free_since(now)
        if since is not None:
            if bucket not in held:
                free.append((bucket, since))
        elif lease.holder in counts:
            counts[lease.holder] += 1
    counts[me] = len(held)
    take = list(ours)
    if free:
        rand.shuffle(free)  # replicas starting together then rarely want the same one
        want = share - len(held) - len(ours)
        for bucket, since in free:
            # Beyond the share: only what nobody else took for a few rounds (whoever is
            # short of its share takes such a bucket at its next round).
            if want > 0 or now - since >= ORPHAN_ROUNDS * settings.retry_period:
                take.append(bucket)
                want -= 1
    return Plan(tuple(take), _give(me, held, counts, floor), share, live)


def _give(me: str, held: frozenset[int], counts: Mapping[str, int], floor: int) -> tuple[int, ...]:
    """One bucket back this round if another replica holds fewer than the floor and this
    one is among the fullest that together make up that shortfall (ties by name): every
    replica decides alike from the same listing, so about as many move as must. (Giving
    only above the share left 32 buckets over 5 replicas at 7, 7, 7, 7 and 4 for good.)"""
    short = sum(floor - n for m, n in counts.items() if m != me and n < floor)
    if not short or len(held) <= floor:
        return ()
    fullest = sorted((m for m, n in counts.items() if n > floor), key=lambda m: (-counts[m], m))
    if me not in fullest[:short]:
        return ()
    return tuple(sorted(held, reverse=True)[:RELEASES_PER_ROUND])


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
        self._settings, self._store = settings, store
        self._ownership, self._handover = ownership, handover
        self._clock, self._wall, self._sleep = clock, wall, sleep
        self._rand = rand or random.Random()
        self._seen: dict[str, _Seen] = {}
        self._absent: dict[int, float] = {}  # buckets without a Lease: since when
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

    @property
    def selector(self) -> str:
        return f"{GROUP_LABEL}={self._settings.group}"

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as exc:
                # The API server away or refusing: what is held stays held until its
                # renew deadline (checked below), and is then parked.
                self._blind = True
                log.warning("lease round failed (%s)", _why(exc))
            if self._rounds >= 2:
                self.first_takes.set()
            self._expire_unrenewed()
            period = self._settings.retry_period * (0.9 + 0.2 * self._rand.random())
            await self._sleep(min(period, self._until_expiry()))

    def _until_expiry(self) -> float:
        """Seconds until another replica's bucket Lease expires, as seen here: the next
        round then comes right after, not up to a retry period later (a dead replica's
        watches wait that much less)."""
        me, now = self._settings.identity, self._clock()
        ends = [
            end
            for lease in self._seen.values()
            if lease.role == BUCKET
            and lease.holder not in ("", me)
            and (end := lease.since + lease.duration) > now  # expired ones: taken or not
        ]
        return min(ends, default=math.inf) - now + EXPIRY_MARGIN

    async def round(self) -> None:
        settings = self._settings
        self._rounds += 1
        listed = await self._retrying(
            lambda: self._store.list_leases(settings.namespace, self.selector)
        )
        now = self._clock()
        if self._blind:
            # After an outage every Lease looks unchanged for as long as it lasted: its
            # holder counts as alive until it has had a lease duration to renew. (A
            # replica takes its own buckets back at once: see `plan`.)
            self._seen = {}
            self._blind = False
        self._observe(listed, now)
        try:
            await self._renew_member()
        except Exception as exc:  # its buckets' own renewals are what keep them
            log.warning("could not renew member lease (%s)", _why(exc))
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
            seen=self._seen,
            absent=self._absent,
            held=self._ownership.held,
            now=self._clock(),
            rand=self._rand,
        )
        self.last_plan = current
        await self._take_all(current)
        if current.give:
            await self._give(frozenset(current.give))
        await self._collect_garbage()

    async def release(self, budget: float) -> None:
        """On the way out: hand every bucket over and leave the group."""
        held = self._ownership.held
        if held:
            await self._give(held, budget)
        try:
            await self._store.delete_lease(self._settings.namespace, self._settings.member_lease)
        except Exception as exc:
            log.warning("could not delete member lease (%s)", exc)

    async def _retrying(self, request: Callable[[], Awaitable[T]]) -> T:
        """One Lease request: each attempt bounded by REQUEST_SHARE of the renew deadline,
        and one that got no answer, a 429 or a 5xx tried again, all within RETRY_SHARE
        of it. A write sent again after an answer was lost meets a 409 (its own first
        attempt changed the Lease): the next listing says whose it is."""
        settings = self._settings
        end = self._clock() + settings.renew_deadline * RETRY_SHARE
        pause = settings.renew_deadline * RETRY_PAUSE_SHARE
        while True:
            try:
                left = end - self._clock()
                async with asyncio.timeout(min(settings.renew_deadline * REQUEST_SHARE, left)):
                    return await request()
            except ApiError as exc:
                if exc.status != 429 and exc.status < 500:
                    raise
                failure: Exception = exc
            except (TimeoutError, Unreachable) as exc:
                failure = exc
            if self._clock() + pause >= end:
                raise failure
            await self._sleep(pause)

    def _observe(self, listed: list[dict[str, Any]], now: float) -> None:
        seen: dict[str, _Seen] = {}
        for body in listed:
            meta = body.get("metadata") or {}
            spec = body.get("spec") or {}
            name = str(meta.get("name"))
            version = str(meta.get("resourceVersion"))
            before = self._seen.get(name)
            transitions = spec.get("leaseTransitions")
            agreement = (meta.get("annotations") or {}).get(AGREEMENT_ANNOTATION)
            seen[name] = _Seen(
                name=name,
                role=str((meta.get("labels") or {}).get(ROLE_LABEL, "")),
                holder=str(spec.get("holderIdentity") or ""),
                duration=float(spec.get("leaseDurationSeconds") or self._settings.lease_duration),
                version=version,
                since=before.since if before is not None and before.version == version else now,
                body=body,
                transitions=transitions if isinstance(transitions, int) else 0,
                agreement=agreement if isinstance(agreement, str) else None,
            )
        self._seen = seen
        for bucket in range(self._settings.buckets):
            if self._settings.bucket_lease(bucket) in seen:
                self._absent.pop(bucket, None)
            else:
                self._absent.setdefault(bucket, now)

    def _disagrees(self, now: float) -> bool:
        """Whether the settings in force in the group (those on the most live bucket
        Leases; ties go to the same value everywhere) are not this replica's. If so it
        takes nothing and gives back what it holds, and says why (`disagreement`)."""
        mine = self._settings.agreement
        counts: Counter[str] = Counter()
        holders: dict[str, str] = {}
        for lease in self._seen.values():
            if lease.role == BUCKET and lease.agreement and not lease.expired(now):
                counts[lease.agreement] += 1
                holders.setdefault(lease.agreement, lease.holder)
        if not counts:
            self.disagreement = None
            return False
        in_force = max(counts, key=lambda text: (counts[text], text))
        if in_force == mine:
            self.disagreement = None
            return False
        message = _disagreement(self._settings, holders[in_force], in_force)
        if message != self.disagreement:
            log.error("%s", message)
        self.disagreement = message
        return True

    def _body(self, name: str, role: str, holder: str, duration: float) -> dict[str, Any]:
        settings = self._settings
        stamp = _micro_time(self._wall())
        before = self._seen.get(name)
        spec: dict[str, Any] = {
            "holderIdentity": holder,
            "leaseDurationSeconds": max(1, round(duration)),
            "renewTime": stamp,
        }
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": settings.namespace,
            "labels": {GROUP_LABEL: settings.group, ROLE_LABEL: role},
        }
        if before is None:
            spec.update(acquireTime=stamp, leaseTransitions=0)
            metadata["annotations"] = {AGREEMENT_ANNOTATION: settings.agreement}
            return {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": metadata,
                "spec": spec,
            }
        old = before.body.get("spec") or {}
        transitions = before.transitions
        if before.holder != holder:
            if holder:
                transitions += 1
                spec["acquireTime"] = stamp
        else:
            spec["acquireTime"] = old.get("acquireTime") or stamp
        spec["leaseTransitions"] = transitions
        metadata["resourceVersion"] = before.version
        # A handover is for the one taking the Lease right after its release: gone with
        # the first write after that.
        annotations = dict(before.body["metadata"].get("annotations") or {})
        annotations.pop(HANDOVER_ANNOTATION, None)
        annotations[AGREEMENT_ANNOTATION] = settings.agreement
        metadata["annotations"] = annotations
        return {**before.body, "metadata": {**before.body["metadata"], **metadata}, "spec": spec}

    async def _write(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        namespace = self._settings.namespace
        if "resourceVersion" not in body["metadata"]:
            written = await self._store.create_lease(namespace, body)
        else:
            written = await self._store.replace_lease(namespace, name, body)
        # What we wrote is what others see changing: it does not start an expiry.
        self._observe_one(written, self._clock())
        return written

    def _observe_one(self, body: dict[str, Any], now: float) -> None:
        others = [lease.body for name, lease in self._seen.items() if name != _name(body)]
        self._observe([*others, body], now)

    async def _renew_member(self) -> None:
        settings = self._settings
        name = settings.member_lease

        async def attempt() -> None:
            body = self._body(name, MEMBER, settings.identity, settings.lease_duration)
            await self._write(name, body)

        await self._retrying(attempt)

    def _forget_taken(self) -> None:
        """Held or parked buckets whose Lease another replica holds now (or nobody, or
        deleted): lost; their watches are dropped, the new holder adopts them."""
        settings = self._settings
        ownership = self._ownership
        lost = {
            bucket
            for bucket in ownership.held | ownership.parked
            if (lease := self._seen.get(settings.bucket_lease(bucket))) is None
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
            valid_until = await self._hold(bucket)
        except Exception as exc:
            log.warning("could not renew bucket %d (%s)", bucket, _why(exc))
            return
        if valid_until is not None:  # None: written meanwhile (409); the next listing says
            self._ownership.renewed(bucket, valid_until)

    async def _take_all(self, current: Plan) -> None:
        """Tries each bucket of the plan on its own: each one won is adopted (or resumed,
        if parked here and nobody held it since) as soon as it is won, whatever happens
        to the others (one slow taking must not hold the others' watches back)."""
        if current.take:
            self._take_foreign_handovers()
        results = await asyncio.gather(
            *(self._take(bucket) for bucket in current.take), return_exceptions=True
        )
        taken: set[int] = set()
        resumed: set[int] = set()
        for bucket, result in zip(current.take, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                log.warning("could not take bucket %d (%s)", bucket, _why(result))
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

    def _take_foreign_handovers(self) -> None:
        """After a change of the settings in force (a new bucket count, say): the
        handovers on Leases released under the old ones belong to watches that may now
        be in any bucket, taken in any order, so all of them are read before the first
        taking, not each with the Lease of the same name."""
        mine = self._settings.agreement
        for lease in self._seen.values():
            if lease.role == BUCKET and not lease.holder and lease.agreement not in (None, mine):
                self._ownership.expect(_decode_handover(lease.body))

    async def _take(self, bucket: int) -> str | None:
        """ "taken", "resumed" (parked here, nobody held it since), or None (another
        replica was first)."""
        settings = self._settings
        before = self._seen.get(settings.bucket_lease(bucket))
        handed = _decode_handover(before.body if before is not None else {})
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
        valid_until = await self._hold(bucket)
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

    async def _hold(self, bucket: int) -> float | None:
        """Writes this replica into the bucket's Lease: until when it may use the bucket
        (renew deadline from when the write that succeeded was sent), or None when
        someone else wrote the Lease since it was listed."""
        settings = self._settings
        name = settings.bucket_lease(bucket)

        async def attempt() -> float:
            sent = self._clock()
            await self._write(
                name, self._body(name, BUCKET, settings.identity, settings.lease_duration)
            )
            return sent + settings.renew_deadline

        try:
            return await self._retrying(attempt)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

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
        await asyncio.gather(*(self._release(b, by_bucket[b]) for b in sorted(buckets)))
        log.info("gave buckets %s back", sorted(buckets))

    async def _release(self, bucket: int, handed: Mapping[tuple[str, str], Handed]) -> None:
        settings = self._settings
        name = settings.bucket_lease(bucket)
        text = _encode_handover(handed, self._wall())

        async def attempt() -> None:
            body = self._body(name, BUCKET, "", 1.0)
            if text is not None:
                body["metadata"].setdefault("annotations", {})[HANDOVER_ANNOTATION] = text
            await self._write(name, body)

        try:
            try:
                await self._retrying(attempt)
            except ApiError as exc:
                # Changed since listed: most often by this replica's own renewal whose
                # answer was lost (a round cut short by SIGTERM). Still ours: again.
                if exc.status != 409:
                    raise
                self._observe(
                    await self._store.list_leases(settings.namespace, self.selector), self._clock()
                )
                lease = self._seen.get(name)
                if lease is None or lease.holder != settings.identity:
                    return
                await self._retrying(attempt)
        except Exception as exc:  # it expires on its own
            log.warning("could not release %s (%s)", name, _why(exc))

    def _expire_unrenewed(self) -> None:
        """Held buckets past their validity are parked (see `Ownership`)."""
        now = self._clock()
        lapsed = sorted(
            bucket for bucket in self._ownership.held if not self._ownership.valid_at(bucket, now)
        )
        if lapsed:
            log.warning("lost buckets %s: not renewed within the renew deadline", lapsed)
        for bucket in lapsed:
            lease = self._seen.get(self._settings.bucket_lease(bucket))
            self._ownership.park(bucket, lease.transitions if lease is not None else -1)

    def _lose(self, buckets: frozenset[int], why: str) -> None:
        log.warning("lost buckets %s: %s", sorted(buckets), why)
        for bucket in buckets:
            self._ownership.give_up(bucket)
        self._handover.drop(buckets)

    async def _collect_garbage(self) -> None:
        """Member Leases of replicas long gone (kill -9, a lost node)."""
        now = self._clock()
        limit = MEMBER_GARBAGE_DURATIONS * self._settings.lease_duration
        for lease in list(self._seen.values()):
            if lease.role == MEMBER and now - lease.since > limit:
                try:
                    await self._store.delete_lease(self._settings.namespace, lease.name)
                except ApiError as exc:
                    if exc.status not in (404, 409):
                        raise


def _disagreement(settings: LeaseSettings, holder: str, in_force: str) -> str:
    """The log line and /healthz text: which setting differs, and what to do."""
    try:
        theirs = {str(k): str(v) for k, v in json.loads(in_force).items()}
    except (ValueError, AttributeError):
        theirs = {}
    mine = json.loads(settings.agreement)
    differ = [
        key for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key)
    ]
    what = ", ".join(f"{key}={theirs.get(key, '?')!r}" for key in differ)
    here = ", ".join(f"{key}={mine.get(key, '?')!r}" for key in differ)
    return (
        f"lease group {settings.group}: replica {holder} runs with {what}, this one with "
        f"{here}; this replica takes no bucket until they agree (docs/operations.md, "
        '"Changing the bucket count")'
    )


def _why(exc: BaseException) -> str:
    """An exception for the log: its message, or its type when it has none (a timeout)."""
    return str(exc) or type(exc).__name__


def _name(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name"))


def _micro_time(epoch: float) -> str:
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label or "replica"


def _encode_handover(handed: Mapping[tuple[str, str], Handed], now: float) -> str | None:
    """`{"t": now in ms since the epoch, "w": {namespace: {name: [last end, next poll,
    attempts, in flight since]}}}`, times in tenths of a second from `t`, rounded up (a
    watch's entry takes its name and about 15 bytes, so a bucket of 4,000 watches with
    names of 20 characters takes about 150 KB); None when there is nothing, or too much,
    to hand over."""
    if not handed:
        return None
    base = round(now * 1000)

    def tenths(value: float | None) -> int | None:
        # Up, never down: a floor or a plan brought forward would come too soon.
        return None if value is None else math.ceil((value * 1000 - base) / 100)

    grouped: dict[str, dict[str, list[int | None]]] = {}
    for (namespace, name), h in handed.items():
        entry = [tenths(h.last_end), tenths(h.next_poll), h.attempts]
        if h.in_flight_since is not None:
            entry.append(tenths(h.in_flight_since))
        grouped.setdefault(namespace, {})[name] = entry
    text = json.dumps({"t": base, "w": grouped}, separators=(",", ":"))
    if len(text) > MAX_HANDOVER_BYTES:
        log.warning("handover of %d watches left out: %d bytes", len(handed), len(text))
        return None
    return text


def _decode_handover(body: Mapping[str, Any]) -> dict[tuple[str, str], Handed]:
    """The handover a released Lease carries; anything unreadable is left out (whoever
    may write Leases in our namespace could put anything there)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        raw = json.loads(annotations.get(HANDOVER_ANNOTATION) or "{}")
    except ValueError:
        return {}
    handed: dict[tuple[str, str], Handed] = {}
    if not isinstance(raw, dict) or not isinstance(raw.get("t"), int):
        return handed
    base = raw["t"]
    namespaces = raw.get("w")
    for namespace, names in namespaces.items() if isinstance(namespaces, dict) else ():
        for name, value in names.items() if isinstance(names, dict) else ():
            timing = _handed(base, value)
            if timing is not None and name:
                handed[(str(namespace), str(name))] = timing
    return handed


def _handed(base: int, value: object) -> Handed | None:
    if not isinstance(value, list) or len(value) not in (3, 4):
        return None
    last_end, next_poll, attempts, *flight = value
    times = (last_end, next_poll, *flight)
    if not all(v is None or (isinstance(v, int) and abs(v) < 2**40) for v in times):
        return None
    if not isinstance(attempts, int) or attempts < 0:
        return None

    def seconds(v: int | None) -> float | None:
        return None if v is None else (base + v * 100) / 1000

    return Handed(
        seconds(last_end), seconds(next_poll), attempts, seconds(flight[0]) if flight else None
    )
