"""Events: a budget of their own, aggregation instead of drops."""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest
from status_fakes import FakeApi, TimedApi, until

from jobwatch.control.status import events
from jobwatch.control.status.events import EventRecorder
from jobwatch.core.refs import ObjectRef
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.errors import ApiError

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
    clock.now += events.EVENT_HOLD
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.ref.name, e.count) for e in api.events[4:]] == [("w4", 2)]
    clock.now += events.EVENT_HOLD  # quiet again: Events of their own
    occur(recorder, "ns", "w6")
    await send_what_the_tokens_allow(recorder, clock)
    assert [(e.ref.name, e.count) for e in api.events[5:]] == [("w6", 1)]


async def test_gathered_events_go_out_after_the_hold_never_sooner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "EVENT_HOLD", 0.3)
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
    monkeypatch.setattr(events, "MAX_EVENT_KINDS", 3)
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
    monkeypatch.setattr(events, "RETRY_DELAY", 0.01)
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
    monkeypatch.setattr(events, "RETRY_DELAY", 0.001)
    api, metrics = FakeApi(), Metrics()
    api.event_failures = [ApiError(422, "invalid"), *[ApiError(503, "down")] * events.EVENT_TRIES]
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
