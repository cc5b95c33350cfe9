"""The status writer's queues: ends first, progress on a grid."""

from __future__ import annotations

import asyncio

import pytest
from status_fakes import FakeApi, TimedApi, make_watch, make_writer, until

from jobwatch.control.status.queue import WriteQueue
from jobwatch.core.policy import Phase


async def test_ends_are_written_before_other_phase_changes() -> None:
    api = FakeApi()
    writer = make_writer(api)
    backlog = [make_watch(f"new{n}") for n in range(5)]
    for watch in backlog:
        writer.submit(watch, urgent=True)
    done = make_watch("done", phase=Phase.SUCCEEDED)
    writer.submit(done, urgent=True)
    await writer.flush(1.0)
    assert api.patches[0][0].name == "done"
    assert len(api.patches) == 6


async def test_a_rerun_replaces_a_queued_end_state() -> None:
    api = FakeApi()
    writer = make_writer(api)
    writer.submit(make_watch("w", phase=Phase.SUCCEEDED), urgent=True)
    rerun = make_watch("w", phase=Phase.PENDING, generation=2)
    writer.submit(rerun, urgent=True)
    await writer.flush(1.0)
    assert [(p[1]["phase"], p[1]["observedGeneration"]) for p in api.patches] == [("Pending", 2)]


def groups(times: list[float], apart: float = 0.015) -> list[int]:
    """Sizes of the runs of times closer than `apart` to the one before."""
    ordered = sorted(times)
    sizes: list[int] = []
    for i, moment in enumerate(ordered):
        if i and moment - ordered[i - 1] < apart:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


async def test_progress_writes_due_within_one_grid_step_go_out_together_none_early() -> None:
    # Progress interval 1.5 s: a grid of 0.1 s. Four objects last written 0.025 s apart
    # fall due within about 0.08 s of each other: one grid step, or two.
    api = TimedApi()
    writer = make_writer(api, progress=1.5)
    task = asyncio.create_task(writer.run())
    watches = [make_watch(f"w{n}") for n in range(4)]
    for count, watch in enumerate(watches, 1):
        writer.submit(watch, urgent=True)
        await until(lambda count=count: len(api.sent) == count)
        await asyncio.sleep(0.025)  # staggers the first writes: not a synchronisation
    first = {name: moment for name, moment in api.sent}
    for watch in watches:
        watch.attempts += 1
        writer.submit(watch, urgent=False)
    await until(lambda: len(api.sent) == 8, timeout=3)
    task.cancel()
    progress = api.sent[4:]
    # No write earlier than its object's interval, none later than one step after it.
    for name, moment in progress:
        assert 1.5 <= moment - first[name] < 1.5 + 0.1 + 0.05, name
    assert len(groups([moment for _, moment in progress])) <= 2


async def test_a_grid_step_takes_no_more_progress_writes_than_its_tokens() -> None:
    # 20 writes/s and a 0.1 s grid: two a step; six due together go out over three steps.
    api = TimedApi()
    writer = make_writer(api, qps=20, burst=20, progress=1.5)
    task = asyncio.create_task(writer.run())
    watches = [make_watch(f"w{n}") for n in range(6)]
    for watch in watches:
        writer.submit(watch, urgent=True)
    await until(lambda: len(api.sent) == 6)
    for watch in watches:
        watch.attempts += 1
        writer.submit(watch, urgent=False)
    await until(lambda: len(api.sent) == 12, timeout=3)
    task.cancel()
    assert groups([moment for _, moment in api.sent[6:]]) == [2, 2, 2]


def test_the_queue_gives_ends_first_and_never_an_object_already_in_flight() -> None:
    queue = WriteQueue(qps=10, progress_interval=60.0, clock=lambda: 0.0)
    queue.put(make_watch("a"), urgent=True, written_at=None)
    queue.put(make_watch("b", phase=Phase.SUCCEEDED), urgent=True, written_at=None)
    first, _ = queue.pop(draining=False)
    assert first is not None and first.ref.name == "b"
    queue.put(make_watch("b", phase=Phase.SUCCEEDED), urgent=True, written_at=None)
    second, _ = queue.pop(draining=False)
    assert second is not None and second.ref.name == "a"  # "b" is being written: it waits
    assert queue.pop(draining=False) == (None, float("inf"))
    assert queue.busy(first.ref) and queue.pending == 1
    queue.inflight.discard(first.ref)
    again, _ = queue.pop(draining=False)
    assert again is not None and again.ref.name == "b"


def test_progress_falls_due_an_interval_after_the_last_write_rounded_up_to_the_grid() -> None:
    now = [100.0]
    queue = WriteQueue(qps=10, progress_interval=15.0, clock=lambda: now[0])  # grid: 1 s
    assert queue.put(make_watch("w"), urgent=False, written_at=90.3)  # the new earliest
    assert queue.pop(draining=False) == (None, pytest.approx(6.0))  # 105.3, up to 106
    assert not queue.put(make_watch("w"), urgent=False, written_at=None)  # queued already
    assert queue.sizes() == {"final": 0, "urgent": 0, "progress": 1}
    now[0] = 106.0
    watch, wait = queue.pop(draining=False)
    assert watch is not None and wait == 0.0
