"""The lease elector: buckets owned through Leases, the fair share, takeover only after
expiry, handover before release, and never two replicas polling one bucket at once;
with an in-memory Lease store that has the API server's optimistic concurrency, and a
fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest
from lease_fakes import Clock, Handover, Store

from jobwatch.control.sharding.elector import Elector
from jobwatch.control.sharding.handed import HANDOVER_ANNOTATION, Handed
from jobwatch.control.sharding.leases import LeaseSettings, bucket_of
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.kube.errors import ApiError, Unreachable

BUCKETS = 32


class Replica:
    def __init__(
        self, name: str, store: Store, clock: Clock, seed: int, buckets: int = BUCKETS
    ) -> None:
        self.settings = LeaseSettings(namespace="ops", identity=name, buckets=buckets)
        self.ownership = Ownership(self.settings, scopes=(None,), clock=clock)
        self.handover = Handover(buckets)

        async def sleep(seconds: float) -> None:  # a retry's pause, on the fake clock
            clock.now += seconds

        self.elector = Elector(
            self.settings,
            store,
            self.ownership,
            self.handover,
            clock=clock,
            wall=clock,
            sleep=sleep,
            rand=random.Random(seed),
        )
        self.alive = True

    async def round(self) -> None:
        if self.alive:
            with contextlib.suppress(Unreachable):
                await self.elector.round()
            self.elector._expire_unrenewed()
            # The informer lists again when told to adopt: the buckets become usable.
            self.ownership.listing(None)

    def polling(self, now: float) -> frozenset[int]:
        return frozenset(b for b in range(BUCKETS) if self.ownership.valid_at(b, now))


class Fleet:
    def __init__(self, names: list[str], store: Store | None = None) -> None:
        self.clock, self.store = Clock(), store or Store()
        self.replicas = {n: Replica(n, self.store, self.clock, i) for i, n in enumerate(names)}

    def join(self, name: str, buckets: int = BUCKETS) -> Replica:
        replica = Replica(name, self.store, self.clock, len(self.replicas), buckets)
        self.replicas[name] = replica
        return replica

    async def rounds(self, count: int, step: float = 2.0) -> None:
        for _ in range(count):
            for replica in self.replicas.values():
                await replica.round()
                self.assert_exclusive()
            self.clock.now += step
            self.assert_exclusive()

    def assert_exclusive(self) -> None:
        """No bucket is polled by two replicas at any moment."""
        now = self.clock.now
        seen: Counter[int] = Counter()
        for replica in self.replicas.values():
            seen.update(replica.polling(now))
        assert all(n == 1 for n in seen.values()), seen

    def shares(self) -> dict[str, int]:
        now = self.clock.now
        return {n: len(r.polling(now)) for n, r in self.replicas.items()}


async def test_three_replicas_share_every_bucket_fairly() -> None:
    fleet = Fleet(["a", "b", "c"])
    await fleet.rounds(4)
    shares = fleet.shares()
    assert sum(shares.values()) == BUCKETS
    assert sorted(shares.values()) == [10, 11, 11]
    # Each Lease names its holder, the one that polls it.
    for name, replica in fleet.replicas.items():
        assert all(fleet.store.holder(b) == name for b in replica.polling(fleet.clock.now))


async def test_a_single_replica_takes_everything() -> None:
    fleet = Fleet(["solo"])
    await fleet.rounds(2)
    assert fleet.shares() == {"solo": BUCKETS}


async def test_a_killed_replicas_buckets_are_taken_only_after_their_lease_expires() -> None:
    fleet = Fleet(["a", "b", "c"])
    await fleet.rounds(4)
    victim = fleet.replicas["c"]
    orphaned = victim.polling(fleet.clock.now)
    victim.alive = False  # kill -9: no release, no more renewals
    killed_at = fleet.clock.now
    taken_at = None
    while taken_at is None:
        await fleet.rounds(1, step=0.5)
        others = fleet.replicas["a"].polling(fleet.clock.now) | fleet.replicas["b"].polling(
            fleet.clock.now
        )
        if orphaned <= others:
            taken_at = fleet.clock.now
        assert fleet.clock.now - killed_at < 60, "never taken over"
    duration = victim.settings.lease_duration
    # Not before the lease duration seen by the others; within it plus a few rounds.
    assert duration - 2.0 <= taken_at - killed_at <= duration + 3 * 2.0
    shares = fleet.shares()
    assert shares["c"] == 0
    assert sorted([shares["a"], shares["b"]]) == [16, 16]


async def test_a_stalled_replica_stops_polling_before_anyone_else_may_start() -> None:
    fleet = Fleet(["a", "b"])
    await fleet.rounds(4)
    sleeper = fleet.replicas["b"]
    held = sleeper.polling(fleet.clock.now)
    sleeper.alive = False  # SIGSTOP
    stopped_at = fleet.clock.now
    # Checked every half second by assert_exclusive: its validity ends first.
    await fleet.rounds(int(2 * sleeper.settings.lease_duration))
    assert sleeper.polling(fleet.clock.now) == frozenset()
    assert held <= fleet.replicas["a"].polling(fleet.clock.now)
    # SIGCONT: its first round finds the Leases taken and drops them.
    sleeper.alive = True
    await fleet.rounds(1)
    assert sleeper.handover.dropped and held <= sleeper.handover.dropped[-1]
    assert fleet.clock.now - stopped_at > sleeper.settings.lease_duration


async def test_a_joining_replica_gets_its_share_by_handover_not_expiry() -> None:
    fleet = Fleet(["a", "b"])
    await fleet.rounds(4)
    assert sorted(fleet.shares().values()) == [16, 16]
    fleet.join("c")
    started = fleet.clock.now
    while sorted(fleet.shares().values()) != [10, 11, 11]:
        await fleet.rounds(1)
        assert fleet.clock.now - started < 60, fleet.shares()
    # Given back by the others (handed over first), not left to expire.
    handed = [b for r in ("a", "b") for batch in fleet.replicas[r].handover.handed for b in batch]
    assert len(handed) >= 10
    assert not any(fleet.replicas[r].handover.dropped for r in ("a", "b"))
    assert fleet.clock.now - started < fleet.replicas["c"].settings.lease_duration * 2


async def test_shutdown_hands_everything_over_and_leaves() -> None:
    fleet = Fleet(["a", "b"])
    await fleet.rounds(4)
    leaving = fleet.replicas["b"]
    held = leaving.polling(fleet.clock.now)
    # Its watches' timing goes with the Leases, for the next holder.
    names = [f"w{n}" for n in range(200)]
    theirs = [n for n in names if bucket_of("team", n, BUCKETS) in held]
    leaving.handover.timing = {
        ("team", n): Handed(last_end=990.5, next_poll=995.25, attempts=7, in_flight_since=991.0)
        for n in theirs
    }
    await leaving.elector.release(5.0)
    leaving.alive = False
    assert leaving.handover.handed[-1] == held
    assert all(fleet.store.holder(b) == "" for b in held)
    assert "jobwatch-member-b" not in fleet.store.leases
    await fleet.rounds(2)  # released Leases are free at once; b's member is gone
    assert fleet.shares()["a"] == BUCKETS
    taker = fleet.replicas["a"].ownership
    # In tenths of a second, rounded up: never a plan or a floor brought forward.
    assert taker.handed("team", theirs[0]) == Handed(990.5, 995.3, 7, 991.0)
    assert taker.handed("team", theirs[0]) is None  # taken once, by the adoption
    # Gone from the Leases with the taker's first write.
    assert not any(
        HANDOVER_ANNOTATION in (lease["metadata"].get("annotations") or {})
        for lease in fleet.store.leases.values()
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"t": 1, "w": {"team": {"w": [1, 2]}}}',
        '{"t": 1, "w": {"team": {"w": ["x", 2, 3]}}}',
        '{"t": 1, "w": {"team": {"w": [1, 2, -3]}}}',
        '{"t": "1", "w": {"team": {"w": [1, 2, 3]}}}',
        '{"t": 1, "w": {"team": [1, 2, 3]}}',
        "[1]",
        "not json",
        '{"team/w": [1, 2, 3]}',
    ],
)
async def test_a_handover_that_cannot_be_read_is_left_out(text: str) -> None:
    fleet = Fleet(["a"])
    await fleet.rounds(1)
    fleet.store.leases["jobwatch-bucket-000"] = {
        "metadata": {
            "name": "jobwatch-bucket-000",
            "labels": {"jobwatch.dev/lease-group": "jobwatch", "jobwatch.dev/lease-role": "bucket"},
            "annotations": {HANDOVER_ANNOTATION: text},
            "resourceVersion": "1",
        },
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 1},
    }
    await fleet.rounds(2)
    assert fleet.shares()["a"] == BUCKETS
    assert fleet.replicas["a"].ownership.handed("team", "w") is None


async def test_api_server_away_every_replica_stops_then_all_resume() -> None:
    fleet = Fleet(["a", "b", "c"])
    await fleet.rounds(4)
    before = {name: r.polling(fleet.clock.now) for name, r in fleet.replicas.items()}
    adopted = {name: r.handover.adopted for name, r in fleet.replicas.items()}
    fleet.store.down = True
    away = fleet.clock.now
    await fleet.rounds(int(2 * 15.0 / 2.0))
    assert set(fleet.shares().values()) == {0}
    # Parked, not dropped: their watches stay, unpolled, for a retake by the same holder.
    assert {name: r.ownership.parked for name, r in fleet.replicas.items()} == before
    stopped = fleet.clock.now - away
    assert stopped > 10.0  # the renew deadline
    fleet.store.down = False
    await fleet.rounds(1)
    # Each takes its own buckets back at once; none looks dead for having been unable
    # to renew while the server was away. Nobody held them in between: their watches go
    # on as they were, with nothing to list again.
    assert {name: r.polling(fleet.clock.now) for name, r in fleet.replicas.items()} == before
    for replica in fleet.replicas.values():
        assert not replica.handover.dropped
        assert replica.handover.adopted == adopted[replica.settings.identity]  # none since
        assert frozenset().union(*replica.handover.resumed) == before[replica.settings.identity]


class RealClock(Clock):
    """The monotonic clock, and a jump forward when a test adds to `now`."""

    def __init__(self) -> None:
        self._offset = 0.0

    @property  # type: ignore[override]
    def now(self) -> float:
        return time.monotonic() + self._offset

    @now.setter
    def now(self, value: float) -> None:
        self._offset += value - self.now

    def __call__(self) -> float:
        return self.now


class FlakyStore(Store):
    """Writes of the named Leases refused, or never answered."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: dict[str, Exception] = {}
        self.stall: set[str] = set()

    async def _fault(self, name: str) -> None:
        if name in self.stall:
            await asyncio.sleep(3600)
        if name in self.refuse:
            raise self.refuse[name]

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        await self._fault(body["metadata"]["name"])
        return await super().create_lease(namespace, body)

    async def replace_lease(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        await self._fault(name)
        return await super().replace_lease(namespace, name, body)


@pytest.mark.parametrize(
    "fault", [ApiError(429, "too many requests"), ApiError(500, "etcd"), ApiError(403, "no")]
)
async def test_a_take_that_fails_costs_only_its_own_bucket(fault: ApiError) -> None:
    store = FlakyStore()
    fleet = Fleet(["a"], store)
    await fleet.rounds(1)  # announces
    store.refuse["jobwatch-bucket-005"] = fault
    await fleet.rounds(1)
    a = fleet.replicas["a"]
    # The others were taken and adopted (their watches listed), not left held but unpolled.
    assert frozenset().union(*a.handover.adoptions) == frozenset(range(BUCKETS)) - {5}
    assert a.polling(fleet.clock.now) == frozenset(range(BUCKETS)) - {5}
    del store.refuse["jobwatch-bucket-005"]
    await fleet.rounds(1)
    assert a.handover.adoptions[-1] == frozenset({5})
    assert fleet.shares() == {"a": BUCKETS}


async def test_a_stalled_renewal_costs_only_its_own_bucket() -> None:
    store = FlakyStore()
    clock = RealClock()  # the attempts' timeouts are the event loop's
    settings = LeaseSettings(
        namespace="ops", identity="a", lease_duration=1.5, renew_deadline=1.0, retry_period=0.3
    )
    ownership = Ownership(settings, scopes=(None,), clock=clock)
    handover = Handover(BUCKETS)
    elector = Elector(settings, store, ownership, handover, clock=clock, wall=clock)
    for _ in range(2):
        await elector.round()
        ownership.listing(None)
    assert ownership.held == frozenset(range(BUCKETS))
    store.stall.add("jobwatch-bucket-007")
    clock.now += 0.3
    renewed_at = clock.now
    await elector.round()
    # Each attempt is cut at half the renew deadline, and all end within three quarters.
    assert clock.now - renewed_at < settings.renew_deadline
    clock.now = renewed_at + 0.9  # past bucket 7's validity, within the others' new one
    elector._expire_unrenewed()
    assert ownership.held == frozenset(range(BUCKETS)) - {7}
    assert ownership.parked == frozenset({7})
    assert not handover.dropped


async def test_replicas_that_disagree_on_the_bucket_count_never_share() -> None:
    fleet = Fleet(["old"])
    await fleet.rounds(3)
    assert fleet.shares() == {"old": BUCKETS}
    new = fleet.join("new", buckets=128)
    await fleet.rounds(5)
    # The settings in force are those on the held Leases: the newcomer takes nothing.
    assert new.ownership.held == frozenset()
    assert fleet.shares()["old"] == BUCKETS
    message = new.elector.disagreement
    assert message is not None
    assert "JOBWATCH_BUCKETS='32'" in message and "JOBWATCH_BUCKETS='128'" in message
    assert "replica old" in message and "takes no bucket" in message
    assert fleet.replicas["old"].elector.disagreement is None
    # Once the old replica is gone (Recreate, or the last old pod stopped), it takes over,
    # with the timing the old one handed over whichever new bucket a watch falls in.
    old = fleet.replicas["old"]
    moved = next(
        ("team", f"w{n}")
        for n in range(1000)
        if bucket_of("team", f"w{n}", 128) != bucket_of("team", f"w{n}", BUCKETS)
    )
    old.handover.timing = {moved: Handed(990.0, 995.0, 4)}
    await old.elector.release(1.0)
    old.alive = False
    await fleet.rounds(1)
    assert new.ownership.handed(*moved) == Handed(990.0, 995.0, 4)
    await fleet.rounds(1)
    assert new.ownership.held == frozenset(range(128))
    assert new.elector.disagreement is None


async def test_a_parked_bucket_another_replica_held_meanwhile_is_adopted_afresh() -> None:
    fleet = Fleet(["a", "b"])
    await fleet.rounds(4)
    sleeper = fleet.replicas["b"]
    held = sleeper.polling(fleet.clock.now)
    sleeper.alive = False
    await fleet.rounds(int(2 * sleeper.settings.lease_duration))
    assert fleet.replicas["a"].polling(fleet.clock.now) == frozenset(range(BUCKETS))
    sleeper.alive = True
    await fleet.rounds(1)
    assert sleeper.ownership.parked == frozenset()
    assert held <= sleeper.handover.dropped[-1]  # its parked watches forgotten
    assert not sleeper.handover.resumed


async def test_a_fifth_replica_gets_at_least_the_floor_of_its_share() -> None:
    # 32 buckets over 4 replicas is 8 each; over 5 the share is 7 and the floor 6. Giving
    # only above the share left the newcomer at 4 for good (a rollout never finished).
    fleet = Fleet(["a", "b", "c", "d"])
    await fleet.rounds(4)
    assert sorted(fleet.shares().values()) == [8, 8, 8, 8]
    fleet.join("e")
    await fleet.rounds(12)
    shares = fleet.shares()
    assert sum(shares.values()) == BUCKETS
    assert min(shares.values()) >= 6 and max(shares.values()) <= 7, shares
    handed = sum(len(b) for r in fleet.replicas.values() for b in r.handover.handed)
    # Replicas decide round by round from listings a moment apart: one more may move.
    assert handed <= shares["e"] + 1
