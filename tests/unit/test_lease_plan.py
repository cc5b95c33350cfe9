"""The elector's planning as plain functions, from one listing and no store: the share,
orphan rounds, the give rule, the settings in force."""

from __future__ import annotations

import random

from jobwatch.control.sharding.leases import BUCKET, MEMBER, LeaseSettings, Seen
from jobwatch.control.sharding.plan import ORPHAN_ROUNDS, in_force, plan, to_give


def lease(name: str, role: str, holder: str, since: float, agreement: str | None = None) -> Seen:
    return Seen(name, role, holder, 15.0, "1", since, {}, agreement=agreement)


def test_alone_a_replica_plans_to_take_every_bucket() -> None:
    settings = LeaseSettings(namespace="ops", identity="a", buckets=4)
    current = plan(settings, seen={}, absent={}, held=frozenset(), now=0.0, rand=random.Random(0))
    assert sorted(current.take) == [0, 1, 2, 3]
    assert (current.give, current.share, current.live) == ((), 4, 1)


def test_a_bucket_free_for_the_orphan_rounds_is_taken_beyond_the_share() -> None:
    settings = LeaseSettings(namespace="ops", identity="a", buckets=4)
    now = ORPHAN_ROUNDS * settings.retry_period

    def at(moment: float) -> tuple[int, ...]:
        seen = {
            settings.bucket_lease(0): lease(settings.bucket_lease(0), BUCKET, "a", moment),
            settings.bucket_lease(1): lease(settings.bucket_lease(1), BUCKET, "a", moment),
            "jobwatch-member-b": lease("jobwatch-member-b", MEMBER, "b", moment),
        }
        absent = {2: 0.0, 3: 0.0}
        current = plan(
            settings,
            seen=seen,
            absent=absent,
            held=frozenset({0, 1}),
            now=moment,
            rand=random.Random(0),
        )
        assert (current.share, current.live) == (2, 2)
        return current.take

    assert at(now - 0.5) == ()  # its share is held: the others' until they had time
    assert sorted(at(now)) == [2, 3]


def test_the_fullest_gives_one_bucket_back_while_another_is_below_the_floor() -> None:
    counts = {"a": 8, "b": 8, "c": 8, "d": 8, "e": 0}
    held = frozenset(range(8))
    assert to_give("a", held, counts, floor=6, share=7) == (7,)
    even = {"a": 7, "b": 7, "c": 6, "d": 6, "e": 6}
    assert to_give("a", frozenset(range(7)), even, floor=6, share=7) == ()  # nobody short


def test_a_replica_above_the_share_gives_one_back_though_nobody_is_below_the_floor() -> None:
    # 32 over 3: 12, 10, 10 has nobody under the floor (10), but 12 is above the share
    # (11); left so, one replica polls a fifth more than the others for good.
    counts = {"a": 10, "b": 12, "c": 10}
    assert to_give("b", frozenset(range(12)), counts, floor=10, share=11) == (11,)
    assert to_give("a", frozenset(range(10)), counts, floor=10, share=11) == ()


def test_the_settings_in_force_are_those_on_the_most_live_bucket_leases() -> None:
    seen = {
        "x1": lease("x1", BUCKET, "a", 0.0, agreement="x"),
        "x2": lease("x2", BUCKET, "b", 0.0, agreement="x"),
        "y1": lease("y1", BUCKET, "c", 0.0, agreement="y"),
        "m": lease("m", MEMBER, "d", 0.0, agreement="y"),
    }
    assert in_force(seen, now=1.0) == ("x", "a")
    assert in_force(seen, now=20.0) is None  # all expired
