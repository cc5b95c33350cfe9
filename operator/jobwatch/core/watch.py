"""The operator's in-memory state of one JobWatch, and how it maps to and from `status`.

The fields mirror `status` (API.md) so that a restarted operator can carry on
from what is stored: the deadline and attempt count survive restarts.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobwatch.core.expressions import CompiledWatch
from jobwatch.core.outcome import Response
from jobwatch.core.policy import END_PHASES, ErrorClass, LastError, Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.core.spec import WatchSpec

if TYPE_CHECKING:  # expiry.py reads times with this module's parse_time
    from jobwatch.core.expiry import Deletion

LAST_BODY_BYTES = 1024
# The last response is kept in memory only to evaluate `spec.result` when the
# watch ends on a later error; bounded so that 10k pending watches with large
# bodies cannot hold gigabytes.
KEEP_RESPONSE_BYTES = 8192
# `status.reason` of a suspended watch that has not ended: how it shows, not a state of
# its own (the phase, error streak and last error stay as the last attempt left them).
SUSPENDED = "Suspended"


def format_time(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_time_seconds(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:  # RFC 3339 always has a zone; a naive one is UTC, not local
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass(slots=True, eq=False)
class Watch:
    ref: ObjectRef
    generation: int
    spec_hash: str
    spec: WatchSpec | None  # None: the spec is invalid (phase Failed, InvalidSpec)
    compiled: CompiledWatch | None
    suspended: bool
    start_time: float
    deadline: float
    phase: Phase = Phase.PENDING
    reason: str = "Accepted"
    message: str = "watch accepted; the first poll is due"
    attempts: int = 0
    consecutive_errors: int = 0
    last_poll_time: float | None = None
    # When the last request ended (wall clock): the timing floor counts from it. Not in
    # `status`; after a restart `lastPollTime` (when it started) stands in for it.
    last_end: float | None = None
    # No request before this (wall clock): a request another replica may still have
    # open at the job service ends by then at the latest (see control.handover.take_over).
    not_before: float | None = None
    next_poll_time: float | None = None
    completion_time: float | None = None
    last_response: dict[str, Any] | None = None
    last_error: LastError | None = None
    result: Any = None
    response: Response | None = None
    # condition type -> (status, lastTransitionTime): kept so that a transition
    # time changes only when the condition's status does.
    transitions: dict[str, tuple[str, float]] = field(default_factory=dict)
    # A finished watch with `spec.ttlSecondsAfterFinished`: its planned deletion, decided
    # on the object as stored (control/reaper.py); None otherwise.
    deletion: Deletion | None = None

    @property
    def finished(self) -> bool:
        return self.phase in END_PHASES

    @property
    def shown(self) -> tuple[str, str]:
        """`status.reason` and `message`: the watch's own, or, while it is suspended and
        has not ended, that it is suspended and when the deadline falls."""
        if self.suspended and not self.finished:
            deadline = format_time_seconds(self.deadline)
            return SUSPENDED, (
                "polling is suspended (spec.suspend); "
                f"the deadline keeps counting and falls at {deadline}"
            )
        return self.reason, self.message

    def record_response(self, response: Response) -> None:
        body = response.text
        if len(body) > LAST_BODY_BYTES:
            body = body.encode()[:LAST_BODY_BYTES].decode(errors="ignore")
        self.last_response = {"code": response.code, "latencyMs": response.latency_ms, "body": body}
        self.response = response if len(response.text) <= KEEP_RESPONSE_BYTES else None

    def resume_from(self, status: Mapping[str, Any]) -> None:
        """Carries on the watch that `status` describes (same spec hash).

        Tolerant of any content: whoever may write `status` can put anything there, and
        a field that cannot be read falls back to its default rather than failing the
        adoption.
        """
        try:
            self.phase = Phase(status.get("phase", "Pending"))
        except (ValueError, TypeError):
            self.phase = Phase.PENDING
        reason = str(status.get("reason") or self.reason)
        if reason == SUSPENDED:
            # Shown again while still suspended; resumed, a watch that has polled says
            # so until its next poll speaks (one that has not keeps "Accepted").
            if self.phase is Phase.POLLING:
                self.reason, self.message = "Polling", "polling resumed; the next poll is due"
        else:
            self.reason = reason
            self.message = str(status.get("message") or self.message)
        self.attempts = _count(status.get("attempts"))
        self.consecutive_errors = _count(status.get("consecutiveErrors"))
        self.start_time = parse_time(status.get("startTime")) or self.start_time
        self.deadline = parse_time(status.get("deadline")) or self.deadline
        self.last_poll_time = self.last_end = parse_time(status.get("lastPollTime"))
        self.next_poll_time = parse_time(status.get("nextPollTime"))
        self.completion_time = parse_time(status.get("completionTime"))
        last_response = status.get("lastResponse")
        self.last_response = dict(last_response) if isinstance(last_response, Mapping) else None
        last_error = status.get("lastError")
        if isinstance(last_error, Mapping):
            try:
                self.last_error = LastError(
                    ErrorClass(str(last_error.get("class"))), str(last_error.get("message", ""))
                )
            except ValueError:
                self.last_error = None
        self.result = status.get("result")
        conditions = status.get("conditions")
        for cond in conditions if isinstance(conditions, list) else ():
            if not isinstance(cond, Mapping):
                continue
            since = parse_time(cond.get("lastTransitionTime"))
            if since is not None:
                self.transitions[str(cond.get("type"))] = (str(cond.get("status")), since)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
