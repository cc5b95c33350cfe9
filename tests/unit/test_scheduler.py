"""The scheduler: order, replacement, cancellation and the in-flight cap."""

from __future__ import annotations

import asyncio
import time

from jobwatch.control.scheduler import Scheduler
from jobwatch.kits.metrics import Metrics


async def wait_until(predicate: object, timeout: float = 2.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_runs_keys_in_time_order() -> None:
    ran: list[str] = []

    async def job(key: str) -> None:
        ran.append(key)

    scheduler: Scheduler[str] = Scheduler(job, workers=1, metrics=Metrics(), clock=time.monotonic)
    scheduler.start()
    now = time.monotonic()
    scheduler.schedule("c", now + 0.06)
    scheduler.schedule("a", now + 0.02)
    scheduler.schedule("b", now + 0.04)
    await wait_until(lambda: len(ran) == 3)
    await scheduler.stop()
    assert ran == ["a", "b", "c"]


async def test_rescheduling_replaces_and_cancel_removes() -> None:
    ran: list[tuple[str, float]] = []

    async def job(key: str) -> None:
        ran.append((key, time.monotonic()))

    scheduler: Scheduler[str] = Scheduler(job, workers=2, metrics=Metrics(), clock=time.monotonic)
    scheduler.start()
    start = time.monotonic()
    scheduler.schedule("moved", start + 0.02)
    scheduler.schedule("moved", start + 0.1)
    scheduler.schedule("gone", start + 0.02)
    scheduler.cancel("gone")
    scheduler.schedule("marker", start + 0.15)
    await wait_until(lambda: any(key == "marker" for key, _ in ran))
    await scheduler.stop()
    assert [key for key, _ in ran] == ["moved", "marker"]
    assert ran[0][1] - start >= 0.1


async def test_workers_cap_jobs_in_flight() -> None:
    in_flight = 0
    peak = 0
    done = 0

    async def job(key: int) -> None:
        nonlocal in_flight, peak, done
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        done += 1

    metrics = Metrics()
    scheduler: Scheduler[int] = Scheduler(job, workers=3, metrics=metrics, clock=time.monotonic)
    scheduler.start()
    now = time.monotonic()
    for key in range(30):
        scheduler.schedule(key, now)
    await wait_until(lambda: done == 30)
    await scheduler.stop()
    assert peak == 3


async def test_a_failing_job_does_not_kill_its_worker() -> None:
    ran: list[int] = []

    async def job(key: int) -> None:
        ran.append(key)
        if key == 1:
            raise RuntimeError("boom")

    scheduler: Scheduler[int] = Scheduler(job, workers=1, metrics=Metrics(), clock=time.monotonic)
    scheduler.start()
    now = time.monotonic()
    scheduler.schedule(1, now)
    scheduler.schedule(2, now + 0.01)
    await wait_until(lambda: ran == [1, 2])
    await scheduler.stop()


async def test_a_key_never_runs_twice_at_once() -> None:
    """A key planned again while its job runs (an edit during a request) waits for it."""
    running: set[str] = set()
    overlaps = 0
    runs = 0
    release = asyncio.Event()

    async def job(key: str) -> None:
        nonlocal overlaps, runs
        overlaps += key in running
        running.add(key)
        runs += 1
        if runs == 1:
            await release.wait()
        running.discard(key)

    scheduler: Scheduler[str] = Scheduler(job, workers=4, metrics=Metrics(), clock=time.monotonic)
    scheduler.start()
    scheduler.schedule("w", time.monotonic())
    await wait_until(lambda: runs == 1)
    scheduler.schedule("w", time.monotonic())  # due now, while the first run is out
    await asyncio.sleep(0.05)  # give a second worker every chance to start it
    assert runs == 1
    release.set()
    await wait_until(lambda: runs == 2)
    await scheduler.stop()
    assert overlaps == 0


async def test_a_held_key_that_is_cancelled_does_not_run() -> None:
    runs = 0
    release = asyncio.Event()

    async def job(key: str) -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    scheduler: Scheduler[str] = Scheduler(job, workers=2, metrics=Metrics(), clock=time.monotonic)
    scheduler.start()
    scheduler.schedule("w", time.monotonic())
    await wait_until(lambda: runs == 1)
    scheduler.schedule("w", time.monotonic())
    await asyncio.sleep(0.02)
    scheduler.cancel("w")  # deleted while held
    release.set()
    scheduler.schedule("marker", time.monotonic() + 0.02)
    await wait_until(lambda: runs == 2)  # the marker
    await asyncio.sleep(0.02)
    await scheduler.stop()
    assert runs == 2


async def test_cancelled_entries_do_not_pile_up() -> None:
    async def job(key: int) -> None:
        pass

    scheduler: Scheduler[int] = Scheduler(job, workers=1, metrics=Metrics(), clock=time.monotonic)
    far = time.monotonic() + 3600
    for round_ in range(20):
        for key in range(1000):
            scheduler.schedule(key, far + round_)  # replaces the previous plan
    assert scheduler.entries <= 2 * 1000 + 1024 + 1
    for key in range(1000):
        scheduler.cancel(key)
    assert scheduler.entries <= 1024 + 1
