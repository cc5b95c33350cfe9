"""The TTL cache with single-flight loads that DNS answers and Secrets share."""

from __future__ import annotations

import asyncio

import pytest

from jobwatch.kits.ttlcache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_is_fresh_for_its_own_ttl_and_kept_after() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10, clock)
    cache.put("a", 1, ttl=5.0)
    cache.put("b", 2, ttl=1.0)
    clock.now = 2.0
    fresh = cache.fresh("a")
    assert fresh is not None and fresh.value == 1
    assert cache.fresh("b") is None
    stale = cache.get("b")
    assert stale is not None and (stale.value, stale.stored) == (2, 0.0)


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: TtlCache[str, int] = TtlCache(2, Clock())
    cache.put("a", 1, ttl=9.0)
    cache.put("b", 2, ttl=9.0)
    assert cache.fresh("a") is not None  # now more recent than "b"
    cache.put("c", 3, ttl=9.0)
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


async def test_callers_of_a_key_share_one_load_that_a_caller_giving_up_does_not_cancel() -> None:
    cache: TtlCache[str, int] = TtlCache(10, Clock())
    release = asyncio.Event()
    loads = 0

    async def fetch() -> int:
        nonlocal loads
        loads += 1
        await release.wait()
        cache.put("k", 7, ttl=1.0)
        return 7

    impatient = asyncio.create_task(cache.load("k", fetch))
    patient = asyncio.create_task(cache.load("k", fetch))
    await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await patient == 7
    assert loads == 1
    with pytest.raises(asyncio.CancelledError):
        await impatient
    fresh = cache.fresh("k")
    assert fresh is not None and fresh.value == 7


async def test_a_failed_load_reaches_every_caller_and_the_next_load_is_new() -> None:
    cache: TtlCache[str, int] = TtlCache(10, Clock())

    async def failing() -> int:
        await asyncio.sleep(0)
        raise LookupError("no")

    results = await asyncio.gather(
        cache.load("k", failing), cache.load("k", failing), return_exceptions=True
    )
    assert all(isinstance(result, LookupError) for result in results)

    async def answering() -> int:
        return 3

    assert await cache.load("k", answering) == 3
