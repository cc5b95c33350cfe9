"""When a finished JobWatch is due for deletion (`spec.ttlSecondsAfterFinished`), with a
Kubernetes Job's meaning: `ttl` seconds after `status.completionTime`.

Layer: core (pure: no I/O, no clock of its own; the caller passes `now`).

The decision is made on the object as stored, never on memory: the time comes from the
status the API server holds, so an operator restart or another replica taking the watch
over computes the same time; and the DELETE that carries it out names the very version
(uid and resourceVersion) the decision was made on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobwatch.core.policy import END_PHASES
from jobwatch.core.spec import SpecError, parse_ttl
from jobwatch.core.watch import parse_time


@dataclass(frozen=True, slots=True)
class Expiry:
    """The deletion one stored version of a JobWatch asks for."""

    uid: str
    resource_version: str  # of the version decided on: the DELETE's precondition
    generation: int  # its metadata.generation
    completion_time: float  # wall clock, from status.completionTime
    ttl: int  # seconds

    @property
    def due(self) -> float:
        """When the JobWatch is to be deleted (wall clock)."""
        return self.completion_time + self.ttl


@dataclass(slots=True)
class Deletion:
    """A finished watch's planned deletion, as the control layer carries it out: what it
    was decided on, and how its attempts went."""

    expiry: Expiry
    tries: int = 0  # failed attempts in a row
    last_failure: str | None = None  # what the last one failed with (HTTP 403, ...)
    booked: bool = False  # a token of the deletion budget is booked for the next attempt


def expiry_of(obj: Mapping[str, Any]) -> Expiry | None:
    """The deletion the JobWatch `obj`, as stored, asks for; None when none: no TTL (or one
    that is not valid), not in an end phase, or a status that does not describe the
    current generation (an edit not acknowledged yet: it may start a new watch, and a
    change of the TTL alone is decided on once acknowledged)."""
    meta, spec, status = (_mapping(obj.get(part)) for part in ("metadata", "spec", "status"))
    try:
        ttl = parse_ttl(spec.get("ttlSecondsAfterFinished"))
    except SpecError:
        return None  # the watch is Failed (InvalidSpec): nothing is deleted on a bad value
    if ttl is None or status.get("phase") not in END_PHASES:
        return None
    generation = generation_of(obj)
    if generation is None or status.get("observedGeneration") != generation:
        return None
    completion = parse_time(status.get("completionTime"))
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    if completion is None or not isinstance(uid, str) or not isinstance(version, str):
        return None
    if not uid or not version:
        return None
    return Expiry(uid, version, generation, completion, ttl)


def generation_of(obj: Mapping[str, Any]) -> int | None:
    """The object's metadata.generation, if it has a valid one."""
    generation = _mapping(obj.get("metadata")).get("generation")
    if isinstance(generation, int) and not isinstance(generation, bool):
        return generation
    return None


def seconds_left(expiry: Expiry, now: float) -> float:
    """Seconds from `now` until the deletion is due; 0 once it is (a time already past,
    after a restart or a handover, deletes at once)."""
    return max(0.0, expiry.due - now)


def _mapping(value: Any) -> Mapping[str, Any]:
    # Whoever may write the object may put anything anywhere in it.
    return value if isinstance(value, Mapping) else {}
