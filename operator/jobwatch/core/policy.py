"""What one attempt's outcome means for a watch, and when to poll next.

Pure: no I/O, no clock, no global random state. The caller passes the wall-clock time
(`now`, `deadline`: epoch seconds) and a `rand()` returning floats in [0, 1), so every
decision is reproducible in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum

from jobwatch.core.durations import format_duration
from jobwatch.core.expressions import CompiledWatch, EvaluationError, excerpt
from jobwatch.core.outcome import FailureKind, Outcome, RequestFailure, Response
from jobwatch.core.spec import Jitter, WatchSpec

Rand = Callable[[], float]

PENDING_SPREAD = 0.1  # a pending poll comes after interval ± 10%
RETRY_AFTER_CODES = frozenset({429, 503})
# How much of the last error an end's message repeats: `lastError` holds all of it.
ERROR_IN_MESSAGE = 1024


class Phase(StrEnum):
    PENDING = "Pending"
    POLLING = "Polling"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TIMED_OUT = "TimedOut"


END_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.TIMED_OUT})


class ErrorClass(StrEnum):
    TRANSIENT = "Transient"
    INVALID_RESPONSE = "InvalidResponse"
    PERMANENT = "Permanent"
    INTERNAL = "Internal"  # a fault inside the operator while handling this one watch


@dataclass(frozen=True, slots=True)
class LastError:
    error_class: ErrorClass
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The watch's state after an attempt; `delay` is None once the watch has ended."""

    phase: Phase
    reason: str
    message: str
    consecutive_errors: int
    error: LastError | None
    delay: float | None

    @property
    def finished(self) -> bool:
        return self.phase in END_PHASES


def decide(
    spec: WatchSpec,
    compiled: CompiledWatch,
    outcome: Outcome,
    consecutive_errors: int,
    *,
    now: float,
    deadline: float,
    rand: Rand,
) -> Decision:
    """API.md "What one attempt decides, in order", for one outcome.

    An expression that cannot be evaluated is an `InvalidResponse` error only when the
    code is 2xx/3xx. On any other code the response is an error page, not a job status
    the expressions were written for, so it is judged by its status code: a 404 page
    stays a permanent error and a 503 page a transient one (with its Retry-After).

    Deadline handling is the caller's: every delay returned ends by `deadline`, where the
    caller times the watch out without sending another request.
    """
    attempt = _Attempt(spec, consecutive_errors, now, deadline, rand)
    if isinstance(outcome, Response):
        return attempt.judge(compiled, outcome)
    if outcome.kind is FailureKind.EGRESS_DENIED:
        return _ended(
            Phase.FAILED,
            "EgressDenied",
            f"request refused: {outcome.message}",
            LastError(ErrorClass.PERMANENT, outcome.message),
        )
    if outcome.kind is FailureKind.INVALID_RESPONSE:
        error = LastError(ErrorClass.INVALID_RESPONSE, outcome.message)
        return attempt.transient("InvalidResponse", error)
    return attempt.transient("TransientError", LastError(ErrorClass.TRANSIENT, outcome.message))


@dataclass(frozen=True, slots=True)
class _Attempt:
    spec: WatchSpec
    consecutive_errors: int
    now: float
    deadline: float
    rand: Rand

    def judge(self, compiled: CompiledWatch, response: Response) -> Decision:
        code = response.code
        ok = 200 <= code < 400
        try:
            failed, succeeded = compiled.judge(response)
            if failed:
                message = f"failureWhen matched (HTTP {code})"
                return _ended(
                    Phase.FAILED,
                    "FailureConditionMet",
                    f"job failed: {message}",
                    LastError(ErrorClass.PERMANENT, message),
                )
            if succeeded:
                message = f"job finished: successWhen matched (HTTP {code})"
                return _ended(Phase.SUCCEEDED, "SuccessConditionMet", message)
        except EvaluationError as problem:
            if ok:
                body = excerpt(response.text) or "(empty)"
                # Why JSON-looking text is no body (too deep, NaN, out of range); plain
                # text or HTML speaks for itself in the excerpt.
                why = response.body_problem
                unusable = f" ({why})" if why and not why.startswith("not JSON") else ""
                message = f"cannot evaluate {problem} (HTTP {code}){unusable}; body: {body}"
                return self.transient(
                    "InvalidResponse", LastError(ErrorClass.INVALID_RESPONSE, message)
                )
        if code in self.spec.permanent_status_codes:
            message = f"HTTP {code} from the endpoint is a permanent error"
            return _ended(
                Phase.FAILED,
                "PermanentHTTPError",
                f"job failed: {message}",
                LastError(ErrorClass.PERMANENT, message),
            )
        if not ok:
            return self.transient(
                "HTTPError",
                LastError(ErrorClass.TRANSIENT, f"HTTP {code} from the endpoint"),
                retry_after=retry_after(response, self.now),
            )
        return Decision(
            phase=Phase.POLLING,
            reason="Polling",
            message=f"job still running: neither condition matched (HTTP {code})",
            consecutive_errors=0,
            error=None,
            delay=_until_deadline(pending_delay(self.spec, self.rand), self.now, self.deadline),
        )

    def transient(
        self, reason: str, error: LastError, retry_after: float | None = None
    ) -> Decision:
        errors = self.consecutive_errors + 1
        limit = self.spec.max_consecutive_errors
        if limit and errors >= limit:
            return Decision(
                phase=Phase.FAILED,
                reason="TooManyErrors",
                message=f"gave up after {errors} consecutive errors; the last one: {error.message}",
                consecutive_errors=errors,
                error=error,
                delay=None,
            )
        if retry_after is None:
            delay = error_delay(self.spec, errors, self.rand)
        else:
            # `interval` is the floor whatever the header says: `Retry-After: 0` (or a
            # date in the past) must not turn a watch into a busy loop.
            delay = max(self.spec.interval, min(retry_after, self.spec.backoff.max_interval))
        return Decision(
            phase=Phase.POLLING,
            reason=reason,
            message=f"retrying after an error: {error.message}",
            consecutive_errors=errors,
            error=error,
            delay=_until_deadline(delay, self.now, self.deadline),
        )


def _ended(phase: Phase, reason: str, message: str, error: LastError | None = None) -> Decision:
    return Decision(phase, reason, message, consecutive_errors=0, error=error, delay=None)


def pending_delay(spec: WatchSpec, rand: Rand) -> float:
    """The delay after a pending response: `interval` spread by up to ±10%."""
    if spec.backoff.jitter is Jitter.NONE:
        return spec.interval
    return spec.interval * (1 - PENDING_SPREAD + 2 * PENDING_SPREAD * rand())


def min_gap(spec: WatchSpec) -> float:
    """The least time between the end of one request of a watch and the start of its next,
    whatever happened meanwhile (edits, restarts, Retry-After): the pending spread's low end."""
    if spec.backoff.jitter is Jitter.NONE:
        return spec.interval
    return spec.interval * (1 - PENDING_SPREAD)


def error_delay(spec: WatchSpec, errors: int, rand: Rand) -> float:
    """The delay after the `errors`-th transient error in a row, capped and jittered.

    The jitter spreads the delay between `interval` and the capped backoff, not down to
    zero as AWS's Full jitter does: no error may bring the next request closer than one
    `interval` to the last (a cap below `interval` gives `interval`).
    """
    backoff = spec.backoff
    floor = spec.interval
    try:
        grown = floor * backoff.factor**errors
    except OverflowError:  # a long streak under no error limit: long past the cap
        grown = backoff.max_interval
    span = max(0.0, min(grown, backoff.max_interval) - floor)
    if backoff.jitter is Jitter.FULL:
        return floor + rand() * span
    if backoff.jitter is Jitter.EQUAL:
        return floor + span / 2 + rand() * span / 2
    return floor + span


def retry_after(response: Response, now: float) -> float | None:
    """Seconds a 429 or 503 asks the client to wait (its valid Retry-After), else None."""
    if response.code not in RETRY_AFTER_CODES:
        return None
    header = response.headers.get("retry-after")
    return None if header is None else parse_retry_after(header, now)


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds from `now` given by a Retry-After header; None when it is not valid.

    Accepts delta-seconds and an HTTP-date (a date in the past means now: 0).
    """
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC by RFC 5322
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def timed_out(now: float, deadline: float) -> bool:
    return now >= deadline


def request_timeout(spec: WatchSpec, now: float, deadline: float) -> float:
    """The timeout of a request sent at `now`: `requestTimeout`, but never past the deadline."""
    return min(spec.request_timeout, max(0.0, deadline - now))


def cut_by_deadline(
    spec: WatchSpec, outcome: Outcome, sent: float, deadline: float
) -> float | None:
    """The time a request sent at `sent` had, when it ran out of it because the deadline
    came before `requestTimeout` did; None for any other outcome.

    Such a request says nothing about the endpoint: the deadline, not the endpoint, cut
    it. It ends the watch as TimedOut without becoming its last error, so that the end
    still names what the attempts before it came to."""
    if not (isinstance(outcome, RequestFailure) and outcome.timed_out):
        return None
    given = request_timeout(spec, sent, deadline)
    return given if given < spec.request_timeout else None


def deadline_exceeded(
    attempts: int,
    consecutive_errors: int,
    last_error: LastError | None,
    *,
    suspended: bool = False,
    not_sent: str | None = None,
    cut_after: float | None = None,
) -> Decision:
    """The deadline passed: TimedOut, keeping the error streak and the last error.

    The message is what a user reads after the fact: how many attempts were made and, when
    the last ones failed, the last error, so that "the job was slow" and "every answer was
    broken" read apart. `not_sent`: why no request was going out at the end (a Secret the
    watch waited for, its host holding it), when that was so. `cut_after`: the time the
    last request had when the deadline cut it (`cut_by_deadline`); the rest of the message
    is then about the attempts before it."""
    message = "deadline passed" + (" while suspended (spec.suspend)" if suspended else "")
    message += f" after {attempts} attempt{'' if attempts == 1 else 's'}"
    judged, last = attempts, "the last one"  # the attempts whose outcome is known
    if cut_after is not None:
        cut = "it" if attempts == 1 else "the last one"
        message += f", cutting {cut} short after {format_duration(round(cut_after, 3))}"
        judged, last = attempts - 1, "the one before it"
    before = "" if cut_after is None else " before it"
    if consecutive_errors and last_error is not None:
        if consecutive_errors > judged:  # some failed before a request went out
            streak = f"{consecutive_errors} errors in a row{before}, the last one"
        elif consecutive_errors == 1:
            streak = f"{last} failed"
        elif cut_after is None:
            streak = f"the last {consecutive_errors} failed, the last one"
        else:
            streak = f"the {consecutive_errors} before it failed, the last one"
        cause = excerpt(last_error.message, ERROR_IN_MESSAGE)
        message += f"; {streak}: {last_error.error_class.value}: {cause}"
    elif not_sent:
        message += f"; no request could be sent: {excerpt(not_sent, ERROR_IN_MESSAGE)}"
    elif judged:
        message += f"; the job was still running at {last}"
    return Decision(
        phase=Phase.TIMED_OUT,
        reason="DeadlineExceeded",
        message=message,
        consecutive_errors=consecutive_errors,
        error=last_error,
        delay=None,
    )


def invalid_spec(message: str) -> Decision:
    """The watch cannot start: `message` names the field (a SpecError or ExpressionError)."""
    return _ended(Phase.FAILED, "InvalidSpec", message, LastError(ErrorClass.PERMANENT, message))


def error(
    spec: WatchSpec,
    consecutive_errors: int,
    reason: str,
    error: LastError,
    *,
    now: float,
    deadline: float,
    rand: Rand,
) -> Decision:
    """A transient error found before or after the request, outside the endpoint's answer:
    a Secret that cannot be read right now, or a fault inside the operator (`Internal`).
    Counted and backed off like any transient error; the deadline still ends the watch."""
    return _Attempt(spec, consecutive_errors, now, deadline, rand).transient(reason, error)


def internal_failure(message: str) -> Decision:
    """The operator could not take the object in at all, so nothing can be retried: the
    watch ends here (an edit of the spec starts a new one)."""
    return _ended(Phase.FAILED, "InternalError", message, LastError(ErrorClass.INTERNAL, message))


def waiting(
    spec: WatchSpec,
    phase: Phase,
    reason: str,
    message: str,
    *,
    now: float,
    deadline: float,
    rand: Rand,
) -> Decision:
    """No request could be sent (e.g. SecretNotFound); check again after a pending delay.

    The phase stays as it is and no error is counted: the Secret may appear later, and
    only the deadline ends the wait. The error streak restarts, as no request was sent.
    """
    return Decision(
        phase=phase,
        reason=reason,
        message=message,
        consecutive_errors=0,
        error=None,
        delay=_until_deadline(pending_delay(spec, rand), now, deadline),
    )


def _until_deadline(delay: float, now: float, deadline: float) -> float:
    return max(0.0, min(delay, deadline - now))


def host_held(
    phase: Phase,
    consecutive_errors: int,
    last_error: LastError | None,
    reason: str,
    message: str,
    *,
    delay: float,
    now: float,
    deadline: float,
) -> Decision:
    """The poll was not sent because its host is not taking requests now (its circuit
    breaker is open, it is at its rate limit, or it asked for a pause with Retry-After):
    try again after `delay`, the deadline still ending the watch.

    Not an attempt and not an error of this watch: the phase, the error streak and the
    last error stay as they are (the poll that follows continues the streak)."""
    return Decision(
        phase=phase,
        reason=reason,
        message=message,
        consecutive_errors=consecutive_errors,
        error=last_error,
        delay=_until_deadline(delay, now, deadline),
    )
