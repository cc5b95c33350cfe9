"""When a finished JobWatch is due for deletion (core/expiry.py): from the object as
stored, spec.ttlSecondsAfterFinished after status.completionTime."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from jobwatch.core.expiry import Expiry, expiry_of, seconds_left
from jobwatch.core.watch import parse_time

COMPLETED = "2026-12-07T10:00:00.250Z"
AT = parse_time(COMPLETED) or 0.0


def stored(ttl: Any = 60, phase: str = "Succeeded", **status: Any) -> dict[str, Any]:
    """A finished JobWatch as the API server holds it."""
    obj: dict[str, Any] = {
        "metadata": {"name": "w", "uid": "uid-1", "resourceVersion": "42", "generation": 3},
        "spec": {"url": "http://jobs/1"},
        "status": {
            "phase": phase,
            "completionTime": COMPLETED,
            "observedGeneration": 3,
            **status,
        },
    }
    if ttl is not None:
        obj["spec"]["ttlSecondsAfterFinished"] = ttl
    return obj


def test_due_ttl_seconds_after_the_stored_completion_time() -> None:
    expiry = expiry_of(stored(60))
    assert expiry is not None
    assert expiry == Expiry("uid-1", "42", 3, AT, 60)
    assert expiry.due == AT + 60
    assert seconds_left(expiry, AT) == 60
    assert seconds_left(expiry, AT + 59.5) == pytest.approx(0.5)


@pytest.mark.parametrize("late", [0.0, 1.0, 86400.0])
def test_a_time_already_past_is_due_at_once(late: float) -> None:
    # After a restart or a handover: deleted at once, never "in -5 s".
    expiry = expiry_of(stored(5))
    assert expiry is not None
    assert seconds_left(expiry, AT + 5 + late) == 0.0


def test_ttl_zero_is_due_at_the_end() -> None:
    expiry = expiry_of(stored(0))
    assert expiry is not None
    assert seconds_left(expiry, AT) == 0.0


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "TimedOut"])
def test_every_end_phase_counts(phase: str) -> None:
    assert expiry_of(stored(1, phase=phase)) is not None


@pytest.mark.parametrize("phase", ["Pending", "Polling", None, "Finished"])
def test_a_watch_that_has_not_ended_is_never_due(phase: str | None) -> None:
    assert expiry_of(stored(1, phase=phase)) is None  # type: ignore[arg-type]


def test_no_ttl_means_never() -> None:
    assert expiry_of(stored(None)) is None


@pytest.mark.parametrize("ttl", [-1, 2**31, 1.5, "60", True, {"s": 1}])
def test_a_ttl_that_is_not_valid_deletes_nothing(ttl: Any) -> None:
    # Such a spec is the watch's InvalidSpec, not a reason to delete it.
    assert expiry_of(stored(ttl)) is None


def test_a_status_of_an_older_generation_is_not_decided_on() -> None:
    # An edit not acknowledged yet: it may start a new watch (a spec change), and a
    # change of the TTL alone is decided on once the operator has acknowledged it.
    obj = stored(1)
    obj["metadata"]["generation"] = 4
    assert expiry_of(obj) is None


@pytest.mark.parametrize("missing", ["completionTime", "observedGeneration"])
def test_a_status_without_what_it_needs_is_never_due(missing: str) -> None:
    obj = stored(1)
    del obj["status"][missing]
    assert expiry_of(obj) is None


@pytest.mark.parametrize("missing", ["uid", "resourceVersion", "generation"])
def test_an_object_without_its_identity_is_never_due(missing: str) -> None:
    # The DELETE's preconditions need both the uid and the version.
    obj = stored(1)
    del obj["metadata"][missing]
    assert expiry_of(obj) is None


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"metadata": None, "spec": None, "status": None},
        {"metadata": [], "spec": "x", "status": 3},
        {**stored(1), "status": {**stored(1)["status"], "completionTime": "yesterday"}},
    ],
)
def test_anything_in_the_object_is_tolerated(obj: dict[str, Any]) -> None:
    assert expiry_of(obj) is None


def test_each_version_is_a_decision_of_its_own() -> None:
    # Same time, another resourceVersion: another decision (the DELETE names the version).
    newer = copy.deepcopy(stored(60))
    newer["metadata"]["resourceVersion"] = "43"
    assert expiry_of(newer) != expiry_of(stored(60))
    assert expiry_of(stored(60)) == expiry_of(stored(60))
