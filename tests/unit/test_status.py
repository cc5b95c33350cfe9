"""The status writer: its politeness rules, retries, flush and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from status_fakes import RETRY_WAIT, FakeApi, make_watch, make_writer, until

from jobwatch.control.status import writer as status
from jobwatch.core.patch import Fence
from jobwatch.core.policy import Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.kits.metrics import Metrics
from jobwatch.kits.ratelimit import TokenBucket
from jobwatch.kube.errors import ApiError


async def test_latest_wins_and_identical_status_is_not_rewritten() -> None:
    api = FakeApi()
    writer = make_writer(api)
    watch = make_watch()
    for attempts in range(5):
        watch.attempts = attempts
        writer.submit(watch, urgent=True)
    task = asyncio.create_task(writer.run())
    await until(lambda: api.patches)
    writer.submit(watch, urgent=True)  # nothing changed since
    watch.attempts = 9
    writer.submit(watch, urgent=True)
    await until(lambda: len(api.patches) == 2)
    task.cancel()
    assert [p[1]["attempts"] for p in api.patches] == [4, 9]


async def test_progress_is_written_at_most_once_per_interval() -> None:
    api = FakeApi()
    writer = make_writer(api, progress=0.3)
    watch = make_watch()
    task = asyncio.create_task(writer.run())
    started = time.monotonic()
    while time.monotonic() - started < 0.75:
        watch.attempts += 1
        writer.submit(watch, urgent=False)
        await asyncio.sleep(0.01)
    await until(lambda: len(api.patches) >= 3)
    task.cancel()
    # Written at once (first), then at ~0.3s and ~0.6s: never more often.
    assert len(api.patches) == 3
    assert api.patches[-1][1]["attempts"] > api.patches[0][1]["attempts"]


async def test_token_bucket_limits_the_fleet_write_rate() -> None:
    api = FakeApi()
    writer = make_writer(api, qps=50, burst=5)
    watches = [make_watch(f"w{n}") for n in range(20)]
    task = asyncio.create_task(writer.run())
    started = time.monotonic()
    for watch in watches:
        writer.submit(watch, urgent=True)
    await until(lambda: len(api.patches) == 20, timeout=3)
    elapsed = time.monotonic() - started
    task.cancel()
    # 5 at once, then 15 at 50/s: at least 0.3 s.
    assert elapsed >= 0.28


async def test_flush_writes_pending_progress_at_once() -> None:
    api = FakeApi()
    writer = make_writer(api, progress=3600)
    watch = make_watch()
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)
    watch.attempts = 7
    writer.submit(watch, urgent=False)  # due only in an hour
    await writer.flush(1.0)
    assert [p[1]["attempts"] for p in api.patches] == [0, 7]


async def test_gone_object_is_dropped_and_server_errors_are_retried() -> None:
    api = FakeApi(fail_with=ApiError(404, "not found"))
    writer = make_writer(api)
    writer.submit(make_watch("gone"), urgent=True)
    await writer.flush(1.0)
    assert api.patches == []
    api.fail_with = ApiError(503, "unavailable")
    writer.submit(make_watch("retried"), urgent=True)
    await writer.flush(3.0)
    assert [p[0].name for p in api.patches] == ["retried"]


def test_token_bucket_refills_at_its_rate_and_gives_no_credit() -> None:
    now = [0.0]
    bucket = TokenBucket(10, 2, lambda: now[0])
    for _ in range(2):
        assert bucket.delay() == 0.0
        bucket.take()
    assert bucket.delay() == pytest.approx(0.1)
    assert bucket.delay() == pytest.approx(0.1)  # asking takes nothing
    now[0] += 0.05
    assert bucket.delay() == pytest.approx(0.05)
    now[0] += 10
    for _ in range(2):  # refilled up to the burst, no further
        assert bucket.delay() == 0.0
        bucket.take()
    assert bucket.delay() == pytest.approx(0.1)


class SlowApi(FakeApi):
    def __init__(self) -> None:
        super().__init__()
        self.concurrent = 0
        self.peak = 0
        self.per_object: dict[str, int] = {}

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        self.concurrent += 1
        self.per_object[ref.name] = self.per_object.get(ref.name, 0) + 1
        assert self.per_object[ref.name] == 1, "one object written twice at once"
        self.peak = max(self.peak, self.concurrent)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.per_object[ref.name] -= 1
            self.concurrent -= 1
        self.patches.append((ref, status))


async def test_writes_overlap_but_never_for_one_object() -> None:
    api = SlowApi()
    writer = make_writer(api)
    watches = [make_watch(f"w{n}") for n in range(16)]
    task = asyncio.create_task(writer.run())
    for watch in watches:
        writer.submit(watch, urgent=True)
    await asyncio.sleep(0.005)
    watches[0].attempts = 5  # changes while its first write is in flight
    writer.submit(watches[0], urgent=True)
    await until(lambda: len(api.patches) == 17)
    task.cancel()
    assert api.peak > 1
    assert [p[1]["attempts"] for p in api.patches if p[0].name == "w0"] == [0, 5]


async def test_a_write_cut_by_shutdown_is_flushed() -> None:
    api = SlowApi()
    writer = make_writer(api)
    task = asyncio.create_task(writer.run())
    writer.submit(make_watch("cut"), urgent=True)
    await until(lambda: api.concurrent == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await writer.flush(1.0)
    assert [p[0].name for p in api.patches] == ["cut"]


async def test_an_end_goes_out_at_the_next_token_while_the_bucket_is_saturated() -> None:
    now = [0.0]  # the writer's clock: no token comes until the test says so
    api = FakeApi()
    writer = make_writer(api, qps=100, burst=2, clock=lambda: now[0])
    for n in range(20):
        writer.submit(make_watch(f"new{n}"), urgent=True)
    task = asyncio.create_task(writer.run())
    await until(lambda: len(api.patches) >= 2)  # the burst; 18 phase changes still queued
    writer.submit(make_watch("done", phase=Phase.SUCCEEDED), urgent=True)
    now[0] += 0.015  # one token, and half of the next
    await until(lambda: len(api.patches) >= 3)
    task.cancel()
    assert [p[0].name for p in api.patches[2:]] == ["done"]


class FailingApi(FakeApi):
    """Every status write fails with `error`; records when each was attempted."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.attempts: list[float] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        self.attempts.append(time.monotonic())
        raise self.error


async def test_at_shutdown_a_failed_write_is_retried_only_within_the_budget(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(status, "RETRY_DELAY", 0.05)
    api = FailingApi(ApiError(503, "unavailable"))
    writer = make_writer(api)
    writer.submit(make_watch(), urgent=True)
    # Writers that were not stopped before the flush must keep to its budget too.
    task = asyncio.create_task(writer.run())
    started = time.monotonic()
    await writer.flush(0.3)
    await asyncio.wait_for(task, 1.0)  # ended with the budget
    assert len(api.attempts) > 1
    assert max(api.attempts) < started + 0.3
    assert "shutdown: 1 status writes and Events were not written" in caplog.text


async def test_flush_ends_at_once_when_the_api_gives_no_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FailingApi(RuntimeError("client is closed"))
    writer = make_writer(api)
    for n in range(5):
        writer.submit(make_watch(f"w{n}"), urgent=True)
    writer.event(make_watch("w0"))
    api.event_failures.append(RuntimeError("client is closed"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await writer.flush(5.0)
    assert time.monotonic() - started < status.RETRY_DELAY
    assert len(api.attempts) == 1
    assert "shutdown: 6 status writes and Events were not written" in caplog.text


async def test_backlog_and_created_events_are_measured() -> None:
    metrics = Metrics()
    api = FakeApi()
    writer = make_writer(api, metrics=metrics)
    writer.submit(make_watch("done", phase=Phase.SUCCEEDED), urgent=True)
    writer.submit(make_watch("changed"), urgent=True)
    writer.submit(make_watch("polled"), urgent=False)
    writer.event(make_watch("changed"))

    def backlog() -> dict[str, float | None]:
        return {
            kind: metrics.registry.get_sample_value("jobwatch_status_backlog", {"kind": kind})
            for kind in ("final", "urgent", "progress", "events")
        }

    assert backlog() == {"final": 1, "urgent": 1, "progress": 1, "events": 1}
    await writer.flush(1.0)
    assert backlog() == {"final": 0, "urgent": 0, "progress": 0, "events": 0}
    assert metrics.registry.get_sample_value("jobwatch_events_created_total") == 1


async def test_a_retry_writes_the_newest_state_not_the_one_that_failed() -> None:
    """A spec edit while a write fails makes a new Watch for the same object: the retry
    must send that one, not bring back the old generation."""
    api = FakeApi(fail_with=ApiError(503, "unavailable"))
    writer = make_writer(api)
    old = make_watch(generation=1)
    writer.submit(old, urgent=True)
    task = asyncio.create_task(writer.run())
    await until(lambda: api.fail_with is None)  # the first write failed
    new = make_watch(generation=2)  # same ref: the same object, edited
    writer.submit(new, urgent=True)
    await until(lambda: api.patches)
    await asyncio.sleep(RETRY_WAIT)  # the failed write's retry comes after a second
    task.cancel()
    assert [p[1]["observedGeneration"] for p in api.patches] == [2]


async def test_a_forgotten_object_is_not_retried() -> None:
    api = FakeApi(fail_with=ApiError(503, "unavailable"))
    writer = make_writer(api)
    watch = make_watch()
    writer.submit(watch, urgent=True)
    task = asyncio.create_task(writer.run())
    await until(lambda: api.fail_with is None)
    writer.forget(watch.ref)  # deleted meanwhile
    await asyncio.sleep(RETRY_WAIT)
    task.cancel()
    assert api.patches == []


async def test_events_never_wait_for_status_writes() -> None:
    frozen = [0.0]  # no status token comes after the first
    api = FakeApi()
    writer = make_writer(api, qps=1, burst=1, clock=lambda: frozen[0])
    for n in range(30):
        writer.submit(make_watch(f"w{n}"), urgent=True)
        writer.event(make_watch(f"w{n}", phase=Phase.SUCCEEDED, reason="SuccessConditionMet"))
    task = asyncio.create_task(writer.run())
    await until(lambda: len(api.events) == 30)
    task.cancel()
    assert len(api.patches) == 1
    assert {e.reason for e in api.events} == {"SuccessConditionMet"}


async def test_a_flush_sends_gathered_events_at_once() -> None:
    api = FakeApi()
    writer = make_writer(api, event_qps=1000, event_burst=1)
    for n in range(4):
        writer.event(make_watch(f"w{n}"))  # one alone, three gathered for EVENT_HOLD
    started = time.monotonic()
    await writer.flush(5.0)
    assert time.monotonic() - started < 1.0
    assert [e.count for e in api.events] == [1, 3]
