"""Status rendering (conditions) and the writer's politeness rules."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from jobwatch import kubeerrors, status, statuspatch
from jobwatch.kubeerrors import ApiError
from jobwatch.metrics import Metrics
from jobwatch.policy import ErrorClass, LastError, Phase
from jobwatch.ratelimit import TokenBucket
from jobwatch.refs import ObjectRef
from jobwatch.status import EventRecorder, StatusWriter, render
from jobwatch.statuspatch import Fence
from jobwatch.watch import Watch

# Longer than StatusWriter's retry delay: a retry that was going to come has come.
RETRY_WAIT = status.RETRY_DELAY + 0.3


def make_watch(name: str = "w", **fields: Any) -> Watch:
    now = time.time()
    watch = Watch(
        ref=ObjectRef("ns", name, f"uid-{name}"),
        generation=1,
        spec_hash="h",
        spec=None,
        compiled=None,
        suspended=False,
        start_time=now,
        deadline=now + 600,
    )
    for key, value in fields.items():
        setattr(watch, key, value)
    return watch


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize(
    ("phase", "ready", "reconciling", "stalled", "finished"),
    [
        (Phase.PENDING, "False", "True", "False", "False"),
        (Phase.POLLING, "False", "True", "False", "False"),
        (Phase.SUCCEEDED, "True", "False", "False", "True"),
        (Phase.FAILED, "False", "False", "True", "True"),
        (Phase.TIMED_OUT, "False", "False", "True", "True"),
    ],
)
def test_conditions_follow_the_phase(
    phase: Phase, ready: str, reconciling: str, stalled: str, finished: str
) -> None:
    status = render(make_watch(phase=phase, reason="R"), time.time())
    got = {kind: value[0] for kind, value in conditions(status).items()}
    assert got == {
        "Ready": ready,
        "Reconciling": reconciling,
        "Stalled": stalled,
        "Finished": finished,
    }
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_suspended_watch_keeps_its_phase_and_says_suspended() -> None:
    watch = make_watch(phase=Phase.POLLING, suspended=True, deadline=1_800_000_600.0)
    watch.last_error = LastError(ErrorClass.TRANSIENT, "HTTP 500 from the endpoint")
    status = render(watch, time.time())
    assert status["phase"] == "Polling"
    assert (status["reason"], status["message"]) == (
        "Suspended",
        "polling is suspended (spec.suspend); the deadline keeps counting and falls at "
        "2027-01-15T08:10:00Z",
    )
    assert set(conditions(status).values()) == {("True", "Suspended"), ("False", "Suspended")}
    assert conditions(status)["Reconciling"] == ("True", "Suspended")
    assert status["nextPollTime"] is None
    assert status["lastError"] == {"class": "Transient", "message": "HTTP 500 from the endpoint"}


def test_a_suspended_watch_that_ended_says_how_it_ended() -> None:
    watch = make_watch(phase=Phase.TIMED_OUT, reason="DeadlineExceeded", suspended=True)
    watch.message = "deadline passed while suspended (spec.suspend) after 0 attempts"
    status = render(watch, time.time())
    assert (status["reason"], status["message"]) == ("DeadlineExceeded", watch.message)
    assert conditions(status)["Stalled"] == ("True", "DeadlineExceeded")


@pytest.mark.parametrize(
    ("phase", "reason", "message"),
    [
        (Phase.POLLING, "Polling", "polling resumed; the next poll is due"),
        (Phase.PENDING, "Accepted", "watch accepted; the first poll is due"),
    ],
)
def test_a_status_read_back_keeps_suspended_only_while_suspended(
    phase: Phase, reason: str, message: str
) -> None:
    """ "Suspended" is how a suspension shows, not where the watch stood: an operator
    restarted after a resume must not show it until the next poll."""
    written = render(make_watch(phase=phase, suspended=True), time.time())
    still = make_watch(suspended=True)
    still.resume_from(written)
    assert render(still, time.time()) == written  # nothing to write again
    resumed = make_watch(suspended=False)
    resumed.resume_from(written)
    assert (resumed.phase, resumed.reason, resumed.message) == (phase, reason, message)


def test_transition_time_changes_only_with_the_condition_status() -> None:
    watch = make_watch(phase=Phase.POLLING)
    first = render(watch, 1_000_000.0)
    again = render(watch, 1_000_100.0)
    assert first["conditions"] == again["conditions"]
    watch.phase = Phase.SUCCEEDED
    done = render(watch, 1_000_200.0)
    ready = next(c for c in done["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "1970-01-12T13:50:00Z"


@dataclass(frozen=True)
class SentEvent:
    ref: ObjectRef
    warning: bool
    reason: str
    message: str
    count: int
    first_seen: datetime.datetime | None


class FakeApi:
    def __init__(self, fail_with: ApiError | None = None) -> None:
        self.patches: list[tuple[ObjectRef, dict[str, Any]]] = []
        self.events: list[SentEvent] = []
        self.fail_with = fail_with
        # Each Event creation takes the next of these, if any: an error to raise.
        self.event_failures: list[Exception] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        self.patches.append((ref, status))

    async def create_event(
        self,
        ref: ObjectRef,
        *,
        warning: bool,
        reason: str,
        message: str,
        count: int = 1,
        first_seen: datetime.datetime | None = None,
    ) -> None:
        if self.event_failures:
            raise self.event_failures.pop(0)
        self.events.append(SentEvent(ref, warning, reason, message, count, first_seen))


def make_writer(
    api: FakeApi,
    *,
    qps: float = 1000,
    burst: int = 1000,
    progress: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    metrics: Metrics | None = None,
    event_qps: float = 1000,
    event_burst: int = 1000,
) -> StatusWriter:
    return StatusWriter(
        api,  # type: ignore[arg-type]
        metrics or Metrics(),
        qps=qps,
        burst=burst,
        event_qps=event_qps,
        event_burst=event_burst,
        progress_interval=progress,
        wall=time.time,
        clock=clock,
        identity="me",
    )


async def until(predicate: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


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


async def test_a_status_that_cannot_be_encoded_is_written_without_the_endpoint_parts() -> None:
    api = FakeApi()
    writer = make_writer(api)
    watch = make_watch(phase=Phase.SUCCEEDED, result={"x": float("nan")})
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)
    ((_, written),) = api.patches
    assert written["phase"] == "Succeeded"
    assert "result" not in written
    assert "not encodable" in written["message"]


async def test_a_status_refused_as_invalid_is_written_again_without_the_endpoint_parts() -> None:
    api = FakeApi(fail_with=ApiError(422, "status.result: Too long"))
    writer = make_writer(api)
    watch = make_watch(phase=Phase.SUCCEEDED, result={"big": "x"})
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)
    ((_, written),) = api.patches
    assert written["phase"] == "Succeeded"
    assert "result" not in written
    assert "refused by the API server (HTTP 422)" in written["message"]


def test_render_writes_exactly_the_fields_the_writer_keeps_hashes_of() -> None:
    # A field missing from status.FIELDS would be invisible to the writer's comparison.
    watch = make_watch(
        phase=Phase.FAILED,
        last_poll_time=time.time(),
        completion_time=time.time(),
        last_response={"code": 500},
        last_error=LastError(ErrorClass.PERMANENT, "boom"),
        result={"a": 1},
    )
    assert tuple(render(watch, time.time())) == status.FIELDS


class WireApi(FakeApi):
    """Records the JSON patch each write sends: in `sent` what it writes, in `fences` the
    tests of the status after the uid's; fails the writes `refuse` says to."""

    def __init__(self, refuse: Callable[[list[dict[str, Any]]], ApiError | None]) -> None:
        super().__init__()
        self.sent: list[list[dict[str, Any]]] = []
        self.fences: list[list[dict[str, Any]]] = []
        self.refuse = refuse

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        ops = json.loads(statuspatch.status_patch(ref.uid, status, fence))
        assert ops[0] == {"op": "test", "path": "/metadata/uid", "value": ref.uid}
        self.fences.append([op for op in ops[1:] if op["op"] == "test"])
        ops = [op for op in ops if op["op"] != "test"]
        self.sent.append(ops)
        error = self.refuse(ops)
        if error is not None:
            raise error
        self.patches.append((ref, status))


def paths(ops: list[dict[str, Any]]) -> list[str]:
    return [op["path"] for op in ops]


async def write(writer: StatusWriter, watch: Watch) -> None:
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)


async def test_a_write_sends_only_the_fields_that_changed_and_whole_when_one_goes() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch(phase=Phase.POLLING, next_poll_time=time.time() + 5)
    await write(writer, watch)
    watch.attempts, watch.last_response = 1, {"code": 200, "latencyMs": 3, "body": "{}"}
    watch.last_poll_time = time.time()
    await write(writer, watch)
    watch.phase, watch.reason, watch.completion_time = Phase.SUCCEEDED, "Done", time.time()
    await write(writer, watch)  # nextPollTime goes: only a whole status can say so
    assert [paths(ops) for ops in api.sent] == [
        ["/status"],
        ["/status/attempts", "/status/lastPollTime", "/status/lastResponse"],
        ["/status"],
    ]
    assert api.sent[1][2]["value"] == {"code": 200, "latencyMs": 3, "body": "{}"}
    assert "nextPollTime" not in api.sent[2][0]["value"]


async def test_nulls_in_a_changed_result_stay() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch(result={"a": 1})
    await write(writer, watch)
    watch.result = {"a": None, "b": [None]}
    await write(writer, watch)
    assert api.sent[1] == [{"op": "add", "path": "/status/result", "value": watch.result}]


async def test_fields_the_object_cannot_take_are_written_whole_instead() -> None:
    # The new values are refused as fields (by the schema), not by a test of the patch.
    api = WireApi(lambda ops: ApiError(422, "doc is missing path") if len(ops) > 1 else None)
    writer = make_writer(api)
    watch = make_watch()
    await write(writer, watch)
    watch.attempts, watch.consecutive_errors = 3, 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [
        ["/status"],
        ["/status/attempts", "/status/consecutiveErrors"],
        ["/status"],
    ]
    assert api.sent[2][0]["value"]["attempts"] == 3
    assert len(api.patches) == 2


async def test_after_a_status_written_without_the_endpoints_parts_the_next_goes_whole() -> None:
    def refuse(ops: list[dict[str, Any]]) -> ApiError | None:
        value = ops[0]["value"]
        too_big = isinstance(value, dict) and value.get("result") == "x" * 100
        return ApiError(422, "result: Too long") if too_big else None

    api = WireApi(refuse)
    writer = make_writer(api)
    watch = make_watch(result="x" * 100)
    await write(writer, watch)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"]] * 4
    assert [("result" in ops[0]["value"]) for ops in api.sent] == [True, False, True, False]


async def test_a_forgotten_object_is_written_whole_again() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch()
    await write(writer, watch)
    writer.forget(watch.ref)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"], ["/status"]]


class TimedApi(FakeApi):
    """Records when each status write and Event went out, in one sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, float]] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        self.sent.append((ref.name, time.monotonic()))
        await super().patch_status(ref, status)

    async def create_event(self, ref: ObjectRef, **event: Any) -> None:
        self.sent.append(("event", time.monotonic()))
        await super().create_event(ref, **event)


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


# --- Events -------------------------------------------------------------------------------


class FakeTime:
    """The clock and wall clock of an EventRecorder, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_recorder(
    api: FakeApi, clock: FakeTime, *, burst: int, qps: float = 1.0, metrics: Metrics | None = None
) -> EventRecorder:
    return EventRecorder(
        api,  # type: ignore[arg-type]
        metrics or Metrics(),
        qps=qps,
        burst=burst,
        wall=clock,
        clock=clock,
    )


def occur(recorder: EventRecorder, namespace: str, name: str, reason: str = "Done") -> None:
    recorder.record(
        ObjectRef(namespace, name, f"uid-{name}"),
        warning=reason == "DeadlineExceeded",
        reason=reason,
        message=f"{name} is {reason}",
    )


async def send_what_the_tokens_allow(recorder: EventRecorder, clock: FakeTime) -> None:
    """Creates the Events waiting, gathered ones too, as long as there are tokens: the
    fake clock stands still, so no token comes meanwhile."""
    await recorder.drain(clock.now + 0.5)


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_within_the_event_budget_each_phase_change_is_an_event_of_its_own() -> None:
    api, clock = FakeApi(), FakeTime()
    recorder = make_recorder(api, clock, burst=5)
    for n in range(5):
        occur(recorder, "ns", f"w{n}")
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.ref.name, e.count, e.message) for e in api.events] == [
        (f"w{n}", 1, f"w{n} is Done") for n in range(5)
    ]


async def test_past_the_budget_each_kind_is_gathered_into_one_event() -> None:
    api, clock, metrics = FakeApi(), FakeTime(), Metrics()
    recorder = make_recorder(api, clock, burst=3, metrics=metrics)
    start = clock.now
    for n in range(3):
        occur(recorder, "ns", f"first{n}")  # the burst's tokens: Events of their own
    for n in range(100):
        occur(recorder, "ns", f"a{n}")
        clock.now += 0.01
    for n in range(10):
        occur(recorder, "ns", f"late{n}", "DeadlineExceeded")  # another reason
    for n in range(5):
        occur(recorder, "other", f"b{n}")  # another namespace
    await send_what_the_tokens_allow(recorder, clock)
    assert [e.ref.name for e in api.events] == ["first0", "first1", "first2"]
    clock.now += 3  # three tokens
    await send_what_the_tokens_allow(recorder, clock)
    gathered = {(e.ref.namespace, e.reason): e for e in api.events[3:]}
    assert set(gathered) == {("ns", "Done"), ("ns", "DeadlineExceeded"), ("other", "Done")}
    done = gathered["ns", "Done"]
    assert (done.ref.name, done.count, done.warning) == ("a0", 100, False)
    assert done.first_seen == datetime.datetime.fromtimestamp(start, datetime.UTC)
    assert done.message == (
        "100 similar Events from 2027-01-15T08:00:00Z to 2027-01-15T08:00:00Z "
        "(combined from similar events): a0, a1, a2 and 97 similar; a0: a0 is Done"
    )
    assert (
        gathered["ns", "DeadlineExceeded"].count,
        gathered["ns", "DeadlineExceeded"].warning,
    ) == (
        10,
        True,
    )
    assert "b0, b1, b2 and 2 similar" in gathered["other", "Done"].message
    assert "a0" not in gathered["other", "Done"].message  # never another namespace's names
    # None lost: the counts add up to every phase change recorded.
    assert sum(e.count for e in api.events) == 118
    assert sample(metrics, "jobwatch_events_created_total") == 6
    assert sample(metrics, "jobwatch_events_aggregated_total") == 112
    assert sample(metrics, "jobwatch_events_dropped_total") == 0


async def test_a_kind_just_aggregated_is_gathered_again_though_tokens_are_back() -> None:
    api, clock = FakeApi(), FakeTime()
    recorder = make_recorder(api, clock, burst=1)
    occur(recorder, "ns", "w0")
    occur(recorder, "ns", "w1")  # no token left for it: gathered
    clock.now += 1
    await send_what_the_tokens_allow(recorder, clock)  # w0 alone
    clock.now += 1
    await send_what_the_tokens_allow(recorder, clock)  # w1, gathered: count 1
    assert [e.count for e in api.events] == [1, 1]
    occur(recorder, "ns", "w2")
    occur(recorder, "ns", "w3")
    clock.now += 1
    await send_what_the_tokens_allow(recorder, clock)
    assert [e.count for e in api.events] == [1, 1, 2]
    clock.now += 1  # a token is back, but the kind was aggregated a second ago
    occur(recorder, "ns", "w4")
    occur(recorder, "ns", "w5")
    occur(recorder, "ns", "other", "Failed")  # a kind of its own: not held
    clock.now += 1
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.reason, e.count) for e in api.events[3:]] == [("Failed", 1)]
    clock.now += status.EVENT_HOLD
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.ref.name, e.count) for e in api.events[4:]] == [("w4", 2)]
    clock.now += status.EVENT_HOLD  # quiet again: Events of their own
    occur(recorder, "ns", "w6")
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.ref.name, e.count) for e in api.events[5:]] == [("w6", 1)]


async def test_gathered_events_go_out_after_the_hold_never_sooner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status, "EVENT_HOLD", 0.3)
    api = TimedApi()
    recorder = EventRecorder(
        api,  # type: ignore[arg-type]
        Metrics(),
        qps=100,
        burst=1,
        wall=time.time,
        clock=time.monotonic,
    )
    task = asyncio.create_task(recorder.run())
    started = time.monotonic()
    for n in range(20):
        occur(recorder, "ns", f"w{n}")
    await until(lambda: sum(e.count for e in api.events) == 20, timeout=3)
    task.cancel()
    assert [e.count for e in api.events] == [1, 19]
    assert api.sent[0][1] - started < 0.25
    assert api.sent[1][1] - started >= 0.3


async def test_the_kinds_waiting_are_bounded_and_what_does_not_fit_is_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(status, "MAX_EVENT_KINDS", 3)
    api, clock, metrics = FakeApi(), FakeTime(), Metrics()
    recorder = make_recorder(api, clock, burst=1, metrics=metrics)
    occur(recorder, "ns0", "alone")
    for n in range(6):
        occur(recorder, f"ns{n}", "w")
        occur(recorder, f"ns{n}", "w2")
    assert recorder.pending == 4
    assert sample(metrics, "jobwatch_events_dropped_total") == 6
    assert caplog.text.count("dropping Events") == 1
    for _ in range(4):  # a token each
        clock.now += 10
        await send_what_the_tokens_allow(recorder, clock)
    assert [e.count for e in api.events] == [1, 2, 2, 2]  # with the 6 dropped: all 13


async def test_a_refused_event_is_tried_again_with_what_was_gathered_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status, "RETRY_DELAY", 0.01)
    api, metrics = FakeApi(), Metrics()
    api.event_failures = [ApiError(503, "unavailable"), ApiError(429, "slow down")]
    recorder = EventRecorder(
        api,  # type: ignore[arg-type]
        metrics,
        qps=1000,
        burst=1000,
        wall=time.time,
        clock=time.monotonic,
    )
    task = asyncio.create_task(recorder.run())
    occur(recorder, "ns", "w0")
    await until(lambda: not api.event_failures)
    occur(recorder, "ns", "w1")  # while the first waits to be tried again
    await until(lambda: api.events)
    task.cancel()
    assert [(e.ref.name, e.count) for e in api.events] == [("w0", 2)]
    assert sample(metrics, "jobwatch_events_dropped_total") == 0


async def test_an_event_refused_for_good_is_counted_as_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status, "RETRY_DELAY", 0.001)
    api, metrics = FakeApi(), Metrics()
    api.event_failures = [ApiError(422, "invalid"), *[ApiError(503, "down")] * status.EVENT_TRIES]
    recorder = EventRecorder(
        api,  # type: ignore[arg-type]
        metrics,
        qps=1000,
        burst=1000,
        wall=time.time,
        clock=time.monotonic,
    )
    task = asyncio.create_task(recorder.run())
    occur(recorder, "ns", "invalid")
    occur(recorder, "ns", "tried", "Failed")
    await until(lambda: not api.event_failures and recorder.pending == 0)
    task.cancel()
    assert api.events == []
    assert sample(metrics, "jobwatch_events_dropped_total") == 2


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


# --- The fence: status.holder, a JSON-patch test, repair on refusal, the lease gate -----


class StoredApi(FakeApi):
    """One JobWatch's stored status, patched as kube-apiserver patches it: the patch's
    `test`s are checked (a missing field is null), and one failing refuses the whole
    patch with the answer the real server gives (422, PATCH_NOT_APPLIED)."""

    def __init__(self, ref: ObjectRef, stored: dict[str, Any], generation: int = 1) -> None:
        super().__init__()
        self.ref, self.stored, self.generation = ref, stored, generation
        self.gets = 0
        self.sent: list[list[dict[str, Any]]] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        ops = json.loads(statuspatch.status_patch(ref.uid, status, fence))
        self.sent.append(ops)
        for op in ops:
            if op["op"] == "test" and op["path"] != "/metadata/uid":
                key = op["path"].removeprefix("/status").removeprefix("/")
                held = self.stored.get(key) if key else self.stored
                if held != op["value"]:
                    raise ApiError(422, kubeerrors.PATCH_NOT_APPLIED)
        for op in ops:
            if op["op"] == "add" and op["path"] == "/status":
                self.stored = op["value"]
            elif op["op"] == "add":
                self.stored[op["path"].removeprefix("/status/")] = op["value"]
        self.patches.append((ref, status))

    async def get_jobwatch(self, ref: ObjectRef) -> dict[str, Any] | None:
        self.gets += 1
        meta = {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid}
        return {"metadata": {**meta, "generation": self.generation}, "status": self.stored}


def results(metrics: Metrics, *names: str) -> dict[str, float]:
    return {
        name: metrics.registry.get_sample_value("jobwatch_status_writes_total", {"result": name})
        or 0.0
        for name in names
    }


async def test_every_status_says_who_wrote_it_and_tests_what_its_writer_last_knew() -> None:
    watch = make_watch(phase=Phase.PENDING)
    api = StoredApi(watch.ref, {"observedGeneration": 0})  # never written: the CRD default
    writer = make_writer(api)
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    watch.phase = Phase.POLLING
    await write(writer, watch)
    fences = [[op for op in ops[1:] if op["op"] == "test"] for ops in api.sent]
    assert fences == [
        [
            {"op": "test", "path": "/status/holder", "value": None},
            {"op": "test", "path": "/status/phase", "value": None},
        ],
        [
            {"op": "test", "path": "/status/holder", "value": "me"},
            {"op": "test", "path": "/status/phase", "value": "Pending"},
        ],
    ]
    assert (api.stored["holder"], api.stored["phase"]) == ("me", "Polling")


async def test_a_write_refused_by_its_fence_reads_the_object_once_and_writes_whole_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    watch = make_watch(phase=Phase.POLLING, attempts=3)
    api = StoredApi(watch.ref, {"observedGeneration": 0})
    writer = make_writer(api, metrics=metrics)
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    # Another replica writes meanwhile (it took the object over, say): not an end.
    api.stored = {**api.stored, "holder": "replica-b", "attempts": 4}
    watch.attempts = 5
    writer.submit(watch, urgent=True)
    await writer.flush(status.RETRY_DELAY + 1)  # the rewrite comes after the retry delay
    assert api.gets == 1
    assert len(api.sent) == 3  # written, refused, written again
    refused, again = api.sent[1], api.sent[2]
    assert [op["path"] for op in refused if op["op"] == "add"] == ["/status/attempts"]
    assert [op for op in again if op["op"] != "add"][1:] == [
        {"op": "test", "path": "/status/holder", "value": "replica-b"},
        {"op": "test", "path": "/status/phase", "value": "Polling"},
    ]
    assert [op["path"] for op in again if op["op"] == "add"] == ["/status"]  # whole
    assert (api.stored["holder"], api.stored["attempts"]) == ("me", 5)
    assert results(metrics, "written", "refused", "repaired") == {
        "written": 1,
        "refused": 1,
        "repaired": 1,
    }
    assert caplog.text.count("refused: its status was written meanwhile by replica-b") == 1


async def test_an_end_another_replica_wrote_stands_and_goes_to_the_runtime() -> None:
    metrics = Metrics()
    watch = make_watch(phase=Phase.POLLING)
    api = StoredApi(watch.ref, {"observedGeneration": 0})
    ended: list[dict[str, Any]] = []
    writer = StatusWriter(
        api,  # type: ignore[arg-type]
        metrics,
        qps=1000,
        burst=1000,
        event_qps=1000,
        event_burst=1000,
        progress_interval=60,
        wall=time.time,
        clock=time.monotonic,
        identity="me",
        on_foreign_end=ended.append,
    )
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    end = {"holder": "replica-b", "phase": "Succeeded", "observedGeneration": 1}
    api.stored = dict(end)
    watch.attempts = 1  # this replica, stale, still has progress to write
    await write(writer, watch)
    await asyncio.sleep(status.RETRY_DELAY + 0.3)  # no rewrite comes, not even later
    assert api.stored == end
    assert api.gets == 1
    assert [body["status"] for body in ended] == [end]
    assert len(api.patches) == 1
    assert writer.pending == 0


async def test_the_gate_is_asked_at_the_moment_of_sending() -> None:
    """A write that waited for its token, for a retry, or for the answer to its first
    request (refused as invalid, it goes again whole) sends nothing once the object is
    no longer this replica's."""
    metrics = Metrics()
    now = [0.0]
    ours = {"token", "retry"}
    api = WireApi(lambda ops: ApiError(503, "unavailable"))
    writer = StatusWriter(
        api,  # type: ignore[arg-type]
        metrics,
        qps=10,
        burst=1,
        event_qps=1000,
        event_burst=1000,
        progress_interval=60,
        wall=time.time,
        clock=lambda: now[0],
        identity="me",
        may_write=lambda ref: ref.name in ours,
    )
    task = asyncio.create_task(writer.run())
    writer.submit(make_watch("retry"), urgent=True)  # the burst's token; refused: 503
    await until(lambda: len(api.sent) == 1)
    writer.submit(make_watch("token"), urgent=True)  # waits for a token
    await asyncio.sleep(0.05)
    ours.clear()
    now[0] += 10  # a token, for "token"
    await until(lambda: results(metrics, "not_ours")["not_ours"] == 1)
    await until(lambda: writer.pending == 1, timeout=RETRY_WAIT + 1)  # "retry" is back
    now[0] += 10  # a token for it
    await until(lambda: results(metrics, "not_ours")["not_ours"] == 2)
    task.cancel()
    assert len(api.sent) == 1
    assert results(metrics, "not_ours") == {"not_ours": 2}
    assert writer.pending == 0


async def test_the_gate_is_asked_again_before_a_write_goes_whole() -> None:
    metrics = Metrics()
    ours = {"w"}

    def refuse(ops: list[dict[str, Any]]) -> ApiError | None:
        if ops[0]["path"] == "/status":
            return None
        ours.clear()  # the lease ran out while the field patch was out
        return ApiError(422, 'JobWatch "w" is invalid: status.attempts')

    api = WireApi(refuse)
    writer = make_writer(api, metrics=metrics)
    writer._may_write = lambda ref: ref.name in ours  # type: ignore[method-assign]
    watch = make_watch()
    await write(writer, watch)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"], ["/status/attempts"]]
    assert results(metrics, "not_ours") == {"not_ours": 1}


async def test_events_of_an_object_no_longer_writable_are_not_created() -> None:
    api, clock, metrics = FakeApi(), FakeTime(), Metrics()
    lost: set[str] = set()
    recorder = EventRecorder(
        api,  # type: ignore[arg-type]
        metrics,
        qps=1,
        burst=5,
        wall=clock,
        clock=clock,
        may_write=lambda ref: ref.name not in lost,
    )
    occur(recorder, "ns", "kept")
    occur(recorder, "ns", "lost")
    lost.add("lost")  # while its Event waited to be created
    await send_what_the_tokens_allow(recorder, clock)
    clock.now += 10
    await send_what_the_tokens_allow(recorder, clock)  # and never tried again
    assert [e.ref.name for e in api.events] == ["kept"]
    assert sample(metrics, "jobwatch_events_dropped_total") == 1
