"""Adopting a bucket taken from another replica by reading its objects, not by listing the
scope again: what is read, what waits for its read, and when a list is the way after all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest
from runtime_fakes import FakeApi, FakeHttp, jobwatch  # the runtime's fakes

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.sharding import adoption as adoption_module
from jobwatch.control.sharding.adoption import Adoption
from jobwatch.control.sharding.leases import LeaseSettings, bucket_of
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.kits.metrics import Metrics

BUCKETS = 4


def body(name: str, generation: int = 1, namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name, "generation": generation}}


class Objects:
    """The API server's objects; reads can be held to let events arrive meanwhile."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads: list[tuple[str, str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.failing: set[tuple[str, str]] = set()

    async def read(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.reads.append((namespace, name))
        await self.hold.wait()
        if (namespace, name) in self.failing:
            self.failing.discard((namespace, name))
            raise ConnectionError("no answer")
        return self.stored.get((namespace, name))


def setup(
    names: list[str],
) -> tuple[Ownership, Adoption, Objects, list[tuple[str | None, str, int]]]:
    settings = LeaseSettings("ops", "r0", buckets=BUCKETS)
    ownership = Ownership(settings, scopes=[None])
    objects = Objects()
    taken: list[tuple[str | None, str, int]] = []

    def take_in(kind: str | None, seen: Mapping[str, Any]) -> None:
        meta = seen["metadata"]
        taken.append((kind, meta["name"], meta["generation"]))

    adoption = Adoption(ownership, objects.read, take_in)
    ownership.listing(None)
    for name in names:
        objects.stored[("ns", name)] = body(name)
        assert not adoption.note("ADDED", ("ns", name), body(name))  # nobody's bucket yet
    return ownership, adoption, objects, taken


def in_bucket(bucket: int, count: int) -> list[str]:
    names = (f"w{n}" for n in range(10_000))
    return [n for n in names if bucket_of("ns", n, BUCKETS) == bucket][:count]


async def until(predicate: Any) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_a_taken_bucket_is_adopted_by_reading_only_its_objects() -> None:
    mine, others = in_bucket(0, 5), in_bucket(1, 5)
    ownership, adoption, objects, taken = setup(mine + others)
    ownership.take(0, time.monotonic() + 60, {})
    assert not ownership.owns("ns", mine[0])
    assert adoption.adopt(frozenset({0}), listed=True)
    await until(lambda: ownership.owns("ns", mine[0]))
    assert sorted(objects.reads) == sorted(("ns", n) for n in mine)
    assert sorted(name for _, name, _ in taken) == sorted(mine)
    # From here on the bucket's events are taken in as they come.
    assert adoption.note("MODIFIED", ("ns", mine[0]), body(mine[0], 2))
    assert not adoption.note("MODIFIED", ("ns", others[0]), body(others[0], 2))


async def test_events_during_the_reads_wait_for_them_and_new_objects_are_read_too() -> None:
    mine = in_bucket(2, 3)
    late = in_bucket(2, 4)[-1]
    ownership, adoption, objects, taken = setup(mine)
    objects.hold.clear()
    ownership.take(2, time.monotonic() + 60, {})
    assert adoption.adopt(frozenset({2}), listed=True)
    await until(lambda: len(objects.reads) == 3)
    # An edit of one being read: held, taken in after its read (the newer one wins there).
    assert not adoption.note("MODIFIED", ("ns", mine[0]), body(mine[0], 2))
    # An object first seen now: read as well.
    objects.stored[("ns", late)] = body(late)
    assert not adoption.note("ADDED", ("ns", late), body(late))
    objects.hold.set()
    await until(lambda: ownership.owns("ns", late))
    assert ("ns", late) in objects.reads
    assert taken.index(("ADDED", mine[0], 1)) < taken.index(("MODIFIED", mine[0], 2))
    assert ("ADDED", late, 1) in taken


async def test_a_read_that_fails_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adoption_module, "RETRY", 0.01)
    mine = in_bucket(3, 2)
    ownership, adoption, objects, taken = setup(mine)
    objects.failing.add(("ns", mine[0]))
    ownership.take(3, time.monotonic() + 60, {})
    assert adoption.adopt(frozenset({3}), listed=True)
    await until(lambda: ownership.owns("ns", mine[0]))
    assert objects.reads.count(("ns", mine[0])) == 2
    assert sorted(name for _, name, _ in taken) == sorted(mine)


async def test_a_bucket_given_up_during_its_reads_is_not_adopted() -> None:
    mine = in_bucket(1, 3)
    ownership, adoption, objects, taken = setup(mine)
    objects.hold.clear()
    ownership.take(1, time.monotonic() + 60, {})
    assert adoption.adopt(frozenset({1}), listed=True)
    await until(lambda: len(objects.reads) == 3)
    adoption.stop({1})
    ownership.give_up(1)
    objects.hold.set()
    await asyncio.sleep(0.01)
    assert taken == []
    assert not ownership.owns("ns", mine[0])


def test_a_list_is_the_way_before_the_first_listing_or_for_a_large_share() -> None:
    names = [f"w{n}" for n in range(8 * adoption_module.MIN_READS)]
    _, adoption, _, _ = setup(names)
    assert not adoption.adopt(frozenset({0}), listed=False)  # keys not all known yet
    # A quarter of the fleet is above the share: one list costs less than the reads.
    assert not adoption.adopt(frozenset({0}), listed=True)


async def test_a_runtime_polls_the_watches_of_a_bucket_adopted_by_reads() -> None:
    class Api(FakeApi):
        def __init__(self) -> None:
            super().__init__()
            self.stored: dict[tuple[str, str], dict[str, Any]] = {}

        async def read_jobwatch(self, namespace: str, name: str) -> dict[str, Any] | None:
            await asyncio.sleep(0.01)
            return self.stored.get((namespace, name))

    settings = LeaseSettings("ops", "r0", buckets=BUCKETS)
    ownership = Ownership(settings, scopes=[None])
    api, http = Api(), FakeHttp()
    config = Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000"})
    runtime = Runtime(config, api, http, Metrics(), ownership=ownership)  # type: ignore[arg-type]
    runtime.start()
    ownership.listing(None)
    names = [f"w{n}" for n in range(40)]
    for name in names:
        api.stored[("ns", name)] = jobwatch(name, interval="100ms", timeout="1h")
        runtime.observe("ADDED", api.stored[("ns", name)])
    runtime.start_polling()
    try:
        assert not runtime.watches
        ownership.take(1, time.monotonic() + 60, {})
        assert runtime.adoption is not None and runtime.adoption.adopt(frozenset({1}), listed=True)
        mine = [n for n in names if bucket_of("ns", n, BUCKETS) == 1]
        await until(lambda: all(http.sent.get(f"http://jobs.test/{n}", 0) >= 2 for n in mine))
        assert {key[1] for key in runtime.watches} == set(mine)
    finally:
        await runtime.shutdown(1.0)
