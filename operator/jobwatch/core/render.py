"""Status rendering (layer: core): the `status` of a watch, with its conditions, and
the JSON text and hashes of its fields that the status writer compares and sends.

Pure: no I/O, no clock of its own (the caller passes the time).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable
from typing import Any

from jobwatch.core.policy import Phase
from jobwatch.core.watch import Watch, format_time, format_time_seconds

_ACTIVE = (Phase.PENDING, Phase.POLLING)
STALLED = (Phase.FAILED, Phase.TIMED_OUT)
# A message is a sentence; anything longer was built from something it should not hold.
MAX_MESSAGE = 4096
# The parts of a status that come from the endpoint: what is dropped when the API server
# cannot take the status as it is.
FROM_ENDPOINT = ("result", "lastResponse")
# Every field `render` writes, in its order: what the writer remembers of a status it
# wrote is one hash per field, in this order (0: the field is absent).
FIELDS = (
    "phase",
    "reason",
    "message",
    "attempts",
    "consecutiveErrors",
    "startTime",
    "deadline",
    "lastPollTime",
    "nextPollTime",
    "completionTime",
    "lastResponse",
    "lastError",
    "result",
    "observedGeneration",
    "specHash",
    "holder",
    "conditions",
)
# How a status that was not encodable is encoded once the endpoint's parts are out:
# anything else unexpected becomes a string rather than failing the write again.
encode_leniently = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def _condition(
    watch: Watch, kind: str, *, true: bool, reason: str, message: str, now: float
) -> dict[str, Any]:
    status = "True" if true else "False"
    previous = watch.transitions.get(kind)
    if previous is None or previous[0] != status:
        watch.transitions[kind] = (status, now)
    return {
        "type": kind,
        "status": status,
        "observedGeneration": watch.generation,
        "lastTransitionTime": format_time_seconds(watch.transitions[kind][1]),
        "reason": reason,
        "message": message,
    }


def render(watch: Watch, now: float, holder: str | None = None) -> dict[str, Any]:
    """The whole `status` for `watch`, written by replica `holder`; a None value means the
    field is absent."""
    phase, (reason, message) = watch.phase, watch.shown
    message = message[:MAX_MESSAGE]
    finished = watch.finished
    conditions = [
        _condition(
            watch, "Ready", true=phase == Phase.SUCCEEDED, reason=reason, message=message, now=now
        ),
        _condition(
            watch, "Reconciling", true=phase in _ACTIVE, reason=reason, message=message, now=now
        ),
        _condition(
            watch, "Stalled", true=phase in STALLED, reason=reason, message=message, now=now
        ),
        _condition(watch, "Finished", true=finished, reason=reason, message=message, now=now),
    ]
    error = watch.last_error
    return {
        "phase": phase.value,
        "reason": reason,
        "message": message,
        "attempts": watch.attempts,
        "consecutiveErrors": watch.consecutive_errors,
        "startTime": format_time(watch.start_time),
        "deadline": format_time(watch.deadline),
        "lastPollTime": format_time(watch.last_poll_time) if watch.last_poll_time else None,
        "nextPollTime": (
            format_time(watch.next_poll_time)
            if watch.next_poll_time and not finished and not watch.suspended
            else None
        ),
        "completionTime": format_time(watch.completion_time) if watch.completion_time else None,
        "lastResponse": watch.last_response,
        "lastError": {"class": error.error_class.value, "message": error.message}
        if error
        else None,
        "result": watch.result,
        "observedGeneration": watch.generation,
        "specHash": watch.spec_hash,
        "holder": holder,
        "conditions": conditions,
    }


def minimal(watch: Watch, exc: Exception, holder: str) -> dict[str, Any]:
    """What is written when `render` fails: the phase and why the rest is missing."""
    return {
        "phase": watch.phase.value,
        "reason": watch.shown[0],
        "message": f"status could not be rendered ({type(exc).__name__}); "
        "the operator's log has the details",
        "attempts": watch.attempts,
        "observedGeneration": watch.generation,
        "specHash": watch.spec_hash,
        "holder": holder,
    }


def without_endpoint_parts(status: dict[str, Any], why: str) -> dict[str, Any]:
    """`status` without what came from the endpoint, its message saying so."""
    left = {key: value for key, value in status.items() if key not in FROM_ENDPOINT}
    note = f"; result and last response left out: the status was {why}"
    left["message"] = (str(status.get("message", "")) + note)[:MAX_MESSAGE]
    return left


def field_texts(status: dict[str, Any], encode: Callable[[Any], str]) -> dict[str, str]:
    """The JSON text of each field that is present."""
    return {key: encode(value) for key, value in status.items() if value is not None}


def field_digest(texts: dict[str, str]) -> array[int]:
    """One hash per field of FIELDS (0: absent): all the writer keeps of a written status,
    about 200 bytes a watch, to skip a status already written and to send only the fields
    that changed."""
    return array("q", [hash(texts[key]) if key in texts else 0 for key in FIELDS])


def changed_fields(written: array[int], now: array[int]) -> tuple[str, ...] | None:
    """The fields that differ from the status written before, or None when one was
    removed: a JSON patch can only remove what is certainly there, so such a status
    (an end clears `nextPollTime`) is written whole."""
    if any(new == 0 and old != 0 for old, new in zip(written, now, strict=True)):
        return None
    return tuple(key for key, old, new in zip(FIELDS, written, now, strict=True) if old != new)
