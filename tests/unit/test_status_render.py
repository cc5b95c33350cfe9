"""Status rendering: the fields of a status and its conditions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from status_fakes import make_watch

from jobwatch.core import render as status_render
from jobwatch.core.policy import ErrorClass, LastError, Phase
from jobwatch.core.render import render


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


def test_render_writes_exactly_the_fields_the_writer_keeps_hashes_of() -> None:
    # A field missing from status_render.FIELDS would be invisible to the writer's comparison.
    watch = make_watch(
        phase=Phase.FAILED,
        last_poll_time=time.time(),
        completion_time=time.time(),
        last_response={"code": 500},
        last_error=LastError(ErrorClass.PERMANENT, "boom"),
        result={"a": 1},
    )
    assert tuple(render(watch, time.time())) == status_render.FIELDS
