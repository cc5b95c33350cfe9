"""policy.decide and its helpers: API.md "What one attempt decides, in order", row by row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest

from jobwatch.core.expressions import Cel
from jobwatch.core.outcome import FailureKind, Outcome, RequestFailure, Response
from jobwatch.core.policy import (
    END_PHASES,
    Decision,
    ErrorClass,
    LastError,
    Phase,
    cut_by_deadline,
    deadline_exceeded,
    decide,
    error_delay,
    invalid_spec,
    parse_retry_after,
    pending_delay,
    request_timeout,
    timed_out,
    waiting,
)
from jobwatch.core.spec import WatchSpec, parse_spec

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
LATER = NOW + 7200  # a deadline far enough not to matter
JOB_SPEC: dict[str, Any] = {
    "successWhen": 'response.body.status == "COMPLETED"',
    "failureWhen": 'response.body.status == "FAILED"',
}


def make_spec(**fields: Any) -> WatchSpec:
    return parse_spec({"url": "http://reports.default.svc/api/jobs/42/status", **fields})


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def resp(
    code: int = 200,
    body: Any = None,
    *,
    text: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    if text is None:
        text = "" if body is None else json.dumps(body)
    return Response(code=code, headers=headers or {}, text=text, latency_ms=12)


def run(
    outcome: Outcome,
    errors: int = 0,
    *,
    now: float = NOW,
    deadline: float = LATER,
    rand: float = 0.5,
    **fields: Any,
) -> Decision:
    spec = make_spec(**fields)
    return decide(
        spec,
        Cel().compile(spec),
        outcome,
        errors,
        now=now,
        deadline=deadline,
        rand=fixed(rand),
    )


def transport(message: str = "connection refused") -> RequestFailure:
    return RequestFailure(FailureKind.TRANSPORT, message)


NO_JITTER: dict[str, Any] = {"backoff": {"jitter": "None"}}


# --- 1. no response -----------------------------------------------------------------------


def test_transport_failure_is_a_transient_error() -> None:
    decision = run(transport(), errors=2, **NO_JITTER)
    assert decision == Decision(
        phase=Phase.POLLING,
        reason="TransientError",
        message="retrying after an error: connection refused",
        consecutive_errors=3,
        error=LastError(ErrorClass.TRANSIENT, "connection refused"),
        delay=40.0,  # 5s * 2^3
    )
    assert not decision.finished


def test_invalid_response_failure_is_a_transient_error_of_its_own_class() -> None:
    failure = RequestFailure(FailureKind.INVALID_RESPONSE, "body larger than 1 MiB")
    decision = run(failure, **NO_JITTER)
    assert decision.phase is Phase.POLLING
    assert decision.reason == "InvalidResponse"
    assert decision.error == LastError(ErrorClass.INVALID_RESPONSE, "body larger than 1 MiB")
    assert decision.consecutive_errors == 1
    assert decision.delay == 10.0


def test_egress_denied_ends_the_watch_at_once() -> None:
    failure = RequestFailure(FailureKind.EGRESS_DENIED, "169.254.169.254 is in a denied range")
    decision = run(failure, errors=4)
    assert decision == Decision(
        phase=Phase.FAILED,
        reason="EgressDenied",
        message="request refused: 169.254.169.254 is in a denied range",
        consecutive_errors=0,
        error=LastError(ErrorClass.PERMANENT, "169.254.169.254 is in a denied range"),
        delay=None,
    )
    assert decision.finished


# --- 2. the expressions ---------------------------------------------------------------------


def test_failure_condition_ends_the_watch_as_failed() -> None:
    decision = run(resp(200, {"status": "FAILED"}), errors=2, **JOB_SPEC)
    assert decision == Decision(
        phase=Phase.FAILED,
        reason="FailureConditionMet",
        message="job failed: failureWhen matched (HTTP 200)",
        consecutive_errors=0,
        error=LastError(ErrorClass.PERMANENT, "failureWhen matched (HTTP 200)"),
        delay=None,
    )


def test_success_condition_ends_the_watch_as_succeeded() -> None:
    decision = run(resp(200, {"status": "COMPLETED"}), errors=2, **JOB_SPEC)
    assert decision == Decision(
        phase=Phase.SUCCEEDED,
        reason="SuccessConditionMet",
        message="job finished: successWhen matched (HTTP 200)",
        consecutive_errors=0,
        error=None,
        delay=None,
    )
    assert decision.finished


def test_default_success_is_any_2xx() -> None:
    assert run(resp(204)).reason == "SuccessConditionMet"
    assert run(resp(299)).phase is Phase.SUCCEEDED


def test_failure_when_beats_success_when() -> None:
    decision = run(resp(200), successWhen="true", failureWhen="true")
    assert decision.reason == "FailureConditionMet"


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"failureWhen": "response.code == 404"}, 404, "FailureConditionMet"),
        ({"successWhen": "response.code == 404"}, 404, "SuccessConditionMet"),
        ({"successWhen": "response.code == 410"}, 410, "SuccessConditionMet"),
        ({"failureWhen": "response.code == 503"}, 503, "FailureConditionMet"),
        ({"successWhen": "response.code == 500"}, 500, "SuccessConditionMet"),
    ],
)
def test_an_expression_that_matches_beats_the_status_code(
    fields: dict[str, Any], code: int, reason: str
) -> None:
    assert run(resp(code), **fields).reason == reason


@pytest.mark.parametrize("code", [200, 202, 301, 304, 399])
def test_an_unevaluable_expression_on_2xx_3xx_is_an_invalid_response(code: int) -> None:
    decision = run(
        resp(code, text="<html><body>\n  Service   ok\n</body></html>"),
        errors=1,
        **JOB_SPEC,
        **NO_JITTER,
    )
    assert decision.phase is Phase.POLLING
    assert decision.reason == "InvalidResponse"
    assert decision.consecutive_errors == 2
    assert decision.delay == 20.0
    assert decision.error is not None
    assert decision.error.error_class is ErrorClass.INVALID_RESPONSE
    message = decision.error.message
    assert message.startswith(
        f"cannot evaluate spec.failureWhen: cannot select a field of a null "
        f"value (HTTP {code}); body: "
    )
    assert message.endswith("body: <html><body> Service ok </body></html>")
    assert decision.message == f"retrying after an error: {message}"


def test_the_body_excerpt_is_one_short_line() -> None:
    decision = run(resp(200, text="line\n" * 1000), **JOB_SPEC)
    assert decision.error is not None
    excerpt = decision.error.message.split("body: ", 1)[1]
    assert "\n" not in decision.error.message
    assert len(excerpt) == 200
    assert excerpt.endswith("…")


def test_an_empty_body_is_named_as_such() -> None:
    decision = run(resp(200, text=""), **JOB_SPEC)
    assert decision.error is not None
    assert decision.error.message.endswith("body: (empty)")


def test_a_failure_when_that_cannot_be_evaluated_stops_before_success_when() -> None:
    # Whether the job failed is unknown, so success (default: any 2xx) is not declared.
    decision = run(resp(200, text="not json"), failureWhen='response.body.status == "FAILED"')
    assert decision.reason == "InvalidResponse"


def test_a_non_bool_expression_is_an_invalid_response() -> None:
    decision = run(resp(200, {"status": "COMPLETED"}), successWhen="response.body.status")
    assert decision.reason == "InvalidResponse"
    assert decision.error is not None
    assert "spec.successWhen: evaluated to string, not a bool" in decision.error.message


@pytest.mark.parametrize(
    ("code", "reason", "error_class"),
    [
        (404, "PermanentHTTPError", ErrorClass.PERMANENT),
        (401, "PermanentHTTPError", ErrorClass.PERMANENT),
        (503, "HTTPError", ErrorClass.TRANSIENT),
        (500, "HTTPError", ErrorClass.TRANSIENT),
        (418, "HTTPError", ErrorClass.TRANSIENT),
    ],
)
def test_an_unevaluable_expression_on_an_error_code_is_judged_by_the_code(
    code: int, reason: str, error_class: ErrorClass
) -> None:
    decision = run(resp(code, text="<html>error page</html>"), **JOB_SPEC)
    assert decision.reason == reason
    assert decision.error is not None
    assert decision.error.error_class is error_class
    assert "body" not in decision.error.message


def test_an_error_page_503_keeps_its_retry_after() -> None:
    page = resp(503, text="<html>maintenance</html>", headers={"retry-after": "7"})
    assert run(page, rand=0.0, **JOB_SPEC).delay == 7.0


# --- 3. permanent status codes ------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 403, 404, 405, 410, 422])
def test_default_permanent_codes_end_the_watch_after_one_attempt(code: int) -> None:
    decision = run(resp(code), errors=3)
    assert decision == Decision(
        phase=Phase.FAILED,
        reason="PermanentHTTPError",
        message=f"job failed: HTTP {code} from the endpoint is a permanent error",
        consecutive_errors=0,
        error=LastError(
            ErrorClass.PERMANENT, f"HTTP {code} from the endpoint is a permanent error"
        ),
        delay=None,
    )


def test_permanent_codes_come_from_the_spec() -> None:
    assert run(resp(500), permanentStatusCodes=[500]).reason == "PermanentHTTPError"
    assert run(resp(404), permanentStatusCodes=[500]).reason == "HTTPError"
    assert run(resp(404), permanentStatusCodes=[]).reason == "HTTPError"


def test_a_permanent_2xx_code_still_lets_the_expressions_decide_first() -> None:
    assert run(resp(202), permanentStatusCodes=[202]).reason == "SuccessConditionMet"
    assert run(resp(202), permanentStatusCodes=[202], successWhen="false").reason == (
        "PermanentHTTPError"
    )


# --- 4. transient HTTP errors --------------------------------------------------------------


@pytest.mark.parametrize("code", [408, 429, 500, 501, 502, 503, 504, 599, 402, 409, 418, 451, 100])
def test_other_non_2xx_3xx_codes_are_transient(code: int) -> None:
    decision = run(resp(code), errors=1, **NO_JITTER)
    assert decision == Decision(
        phase=Phase.POLLING,
        reason="HTTPError",
        message=f"retrying after an error: HTTP {code} from the endpoint",
        consecutive_errors=2,
        error=LastError(ErrorClass.TRANSIENT, f"HTTP {code} from the endpoint"),
        delay=20.0,
    )


@pytest.mark.parametrize("code", [429, 503])
@pytest.mark.parametrize(
    ("header", "delay"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        ("0", 5.0),  # never below spec.interval: no busy loop
        ("3600", 60.0),  # clamped to backoff.maxInterval
        (formatdate(NOW + 30, usegmt=True), 30.0),
        (formatdate(NOW + 30.9, usegmt=True), 30.0),  # HTTP-dates have whole seconds
        (formatdate(NOW + 86400, usegmt=True), 60.0),
        (formatdate(NOW - 60, usegmt=True), 5.0),  # a date in the past: after interval
    ],
)
def test_retry_after_sets_the_next_delay(code: int, header: str, delay: float) -> None:
    # rand=0 would make a Full-jitter backoff 0: a different delay shows the header won.
    decision = run(resp(code, headers={"retry-after": header}), rand=0.0)
    assert decision.reason == "HTTPError"
    assert decision.delay == pytest.approx(delay)


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_clamped_to_the_deadline(code: int) -> None:
    decision = run(resp(code, headers={"retry-after": "50"}), deadline=NOW + 3)
    assert decision.delay == 3.0


@pytest.mark.parametrize("header", ["soon", "-5", "1.5", "", "\uff11\uff12", "Wed, 32 Oct 2015"])
def test_an_invalid_retry_after_is_ignored(header: str) -> None:
    decision = run(resp(503, headers={"retry-after": header}), **NO_JITTER)
    assert decision.delay == 10.0  # the backoff


@pytest.mark.parametrize("code", [500, 502, 504, 408])
def test_retry_after_counts_only_for_429_and_503(code: int) -> None:
    decision = run(resp(code, headers={"retry-after": "7"}), **NO_JITTER)
    assert decision.delay == 10.0


def test_retry_after_still_counts_the_error() -> None:
    decision = run(resp(429, headers={"retry-after": "7"}), errors=2, maxConsecutiveErrors=3)
    assert decision.reason == "TooManyErrors"


# --- 5. still pending ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "fields"),
    [
        (resp(200, {"status": "RUNNING"}), JOB_SPEC),
        (resp(202, {"status": "QUEUED"}), JOB_SPEC),
        (resp(301), {}),
        (resp(304), {}),
    ],
)
def test_a_pending_response_polls_again_after_the_interval(
    outcome: Response, fields: dict[str, Any]
) -> None:
    decision = run(outcome, errors=4, rand=0.5, **fields)
    assert decision == Decision(
        phase=Phase.POLLING,
        reason="Polling",
        message=f"job still running: neither condition matched (HTTP {outcome.code})",
        consecutive_errors=0,  # a pending response ends an error streak
        error=None,
        delay=5.0,
    )


@pytest.mark.parametrize(("rand", "delay"), [(0.0, 4.5), (0.25, 4.75), (0.5, 5.0), (0.999, 5.499)])
def test_pending_delay_is_spread_by_ten_percent(rand: float, delay: float) -> None:
    running = resp(200, {"status": "RUNNING"})
    assert run(running, rand=rand, **JOB_SPEC).delay == pytest.approx(delay)
    assert pending_delay(make_spec(), fixed(rand)) == pytest.approx(delay)


@pytest.mark.parametrize("jitter", ["Full", "Equal"])
def test_pending_spread_applies_to_both_jitter_modes(jitter: str) -> None:
    assert pending_delay(make_spec(backoff={"jitter": jitter}), fixed(0.0)) == pytest.approx(4.5)


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_no_pending_spread_without_jitter(rand: float) -> None:
    assert pending_delay(make_spec(**NO_JITTER), fixed(rand)) == 5.0
    running = resp(200, {"status": "RUNNING"})
    assert run(running, rand=rand, **JOB_SPEC, **NO_JITTER).delay == 5.0


# --- backoff after transient errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("jitter", "rand", "delay"),
    [
        # spread between interval (5s) and the backoff (5s * 2² = 20s)
        ("Full", 0.0, 5.0),
        ("Full", 0.5, 12.5),
        ("Full", 0.999, 19.985),
        ("Equal", 0.0, 12.5),
        ("Equal", 0.5, 16.25),
        ("Equal", 0.999, 19.9925),
        ("None", 0.0, 20.0),
        ("None", 0.5, 20.0),
        ("None", 0.999, 20.0),
    ],
)
def test_jitter_modes(jitter: str, rand: float, delay: float) -> None:
    spec = make_spec(backoff={"jitter": jitter})
    assert error_delay(spec, 2, fixed(rand)) == pytest.approx(delay)  # 5s * 2² = 20s
    decision = run(transport(), errors=1, rand=rand, backoff={"jitter": jitter})
    assert decision.delay == pytest.approx(delay)


@pytest.mark.parametrize(
    ("errors", "delay"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (5, 60.0), (50, 60.0), (100_000, 60.0)],
)
def test_backoff_grows_by_factor_up_to_max_interval(errors: int, delay: float) -> None:
    assert error_delay(make_spec(**NO_JITTER), errors, fixed(0.5)) == delay
    assert run(transport(), errors=errors - 1, **NO_JITTER).delay == delay


@pytest.mark.parametrize(
    ("backoff", "errors", "delay"),
    [
        ({"factor": 1}, 1, 5.0),
        ({"factor": 1}, 40, 5.0),
        ({"factor": 1.5}, 2, 11.25),
        ({"factor": 3, "maxInterval": "10m"}, 4, 405.0),
        ({"factor": 2, "maxInterval": "7s"}, 1, 7.0),
        ({"factor": 2, "maxInterval": "1s"}, 1, 5.0),  # the interval is the floor
        ({"factor": 1.0001, "maxInterval": "168h"}, 10_000_000, 604800.0),  # no overflow
    ],
)
def test_backoff_settings(backoff: dict[str, Any], errors: int, delay: float) -> None:
    spec = make_spec(backoff={**backoff, "jitter": "None"})
    assert error_delay(spec, errors, fixed(0.5)) == pytest.approx(delay)


def test_full_jitter_never_exceeds_the_cap() -> None:
    spec = make_spec(backoff={"maxInterval": "30s"})
    assert all(error_delay(spec, n, fixed(0.999)) < 30.0 for n in range(1, 200))


# --- maxConsecutiveErrors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "last"),
    [
        (transport(), LastError(ErrorClass.TRANSIENT, "connection refused")),
        (resp(503), LastError(ErrorClass.TRANSIENT, "HTTP 503 from the endpoint")),
        (
            RequestFailure(FailureKind.INVALID_RESPONSE, "too many redirects"),
            LastError(ErrorClass.INVALID_RESPONSE, "too many redirects"),
        ),
    ],
)
def test_too_many_errors_at_the_limit(outcome: Outcome, last: LastError) -> None:
    decision = run(outcome, errors=2, maxConsecutiveErrors=3)
    assert decision == Decision(
        phase=Phase.FAILED,
        reason="TooManyErrors",
        message=f"gave up after 3 consecutive errors; the last one: {last.message}",
        consecutive_errors=3,
        error=last,
        delay=None,
    )


def test_not_too_many_errors_before_the_limit() -> None:
    for errors in range(2):
        decision = run(resp(503), errors=errors, maxConsecutiveErrors=3)
        assert decision.phase is Phase.POLLING
        assert decision.consecutive_errors == errors + 1


def test_a_limit_of_one_fails_on_the_first_error() -> None:
    assert run(transport(), maxConsecutiveErrors=1).reason == "TooManyErrors"


def test_an_invalid_response_counts_towards_the_limit() -> None:
    decision = run(resp(200, text="<html>"), errors=1, maxConsecutiveErrors=2, **JOB_SPEC)
    assert decision.reason == "TooManyErrors"
    assert decision.error is not None
    assert decision.error.error_class is ErrorClass.INVALID_RESPONSE


@pytest.mark.parametrize("errors", [0, 1, 99, 1_000_000])
def test_max_consecutive_errors_zero_is_unlimited(errors: int) -> None:
    decision = run(transport(), errors=errors, maxConsecutiveErrors=0)
    assert decision.phase is Phase.POLLING
    assert decision.consecutive_errors == errors + 1


def test_a_pending_response_does_not_count_towards_the_limit() -> None:
    decision = run(resp(200, {"status": "RUNNING"}), errors=2, maxConsecutiveErrors=3, **JOB_SPEC)
    assert decision.reason == "Polling"
    assert decision.consecutive_errors == 0


# --- the deadline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome",
    [transport(), resp(503), resp(200, text="<html>"), resp(200, {"status": "RUNNING"})],
)
def test_every_delay_ends_by_the_deadline(outcome: Outcome) -> None:
    decision = run(outcome, deadline=NOW + 1.25, rand=0.999, **JOB_SPEC, **NO_JITTER)
    assert decision.delay == 1.25


@pytest.mark.parametrize("deadline", [NOW, NOW - 10])
def test_at_or_past_the_deadline_the_delay_is_zero(deadline: float) -> None:
    decision = run(resp(200, {"status": "RUNNING"}), deadline=deadline, **JOB_SPEC)
    assert decision.delay == 0.0


def test_a_final_answer_at_the_deadline_still_counts() -> None:
    decision = run(resp(200, {"status": "COMPLETED"}), now=LATER + 1, deadline=LATER, **JOB_SPEC)
    assert decision.phase is Phase.SUCCEEDED


@pytest.mark.parametrize(("now", "expected"), [(NOW - 1, False), (NOW, True), (NOW + 1, True)])
def test_timed_out(now: float, expected: bool) -> None:
    assert timed_out(now, NOW) is expected


NAN_ERROR = LastError(
    ErrorClass.INVALID_RESPONSE,
    "cannot evaluate successWhen: no such key 'status' (HTTP 200) (NaN is not valid JSON); "
    'body: {"status": "COMPLETED", "score": NaN}',
)
HTTP_500 = LastError(ErrorClass.TRANSIENT, "HTTP 500 from the endpoint")


@pytest.mark.parametrize(
    ("attempts", "errors", "last_error", "extra", "message"),
    [
        (
            12,
            12,
            NAN_ERROR,
            {},
            f"deadline passed after 12 attempts; the last 12 failed, the last one: "
            f"InvalidResponse: {NAN_ERROR.message}",
        ),
        (
            3,
            1,
            HTTP_500,
            {},
            "deadline passed after 3 attempts; the last one failed: "
            "Transient: HTTP 500 from the endpoint",
        ),
        (
            0,
            2,
            LastError(ErrorClass.TRANSIENT, "Secret 'token' could not be read (HTTP 503)"),
            {},
            "deadline passed after 0 attempts; 2 errors in a row, the last one: "
            "Transient: Secret 'token' could not be read (HTTP 503)",
        ),
        (
            5,
            0,
            None,
            {},
            "deadline passed after 5 attempts; the job was still running at the last one",
        ),
        (
            1,
            0,
            None,
            {},
            "deadline passed after 1 attempt; the job was still running at the last one",
        ),
        (
            0,
            0,
            None,
            {"suspended": True},
            "deadline passed while suspended (spec.suspend) after 0 attempts",
        ),
        (
            4,
            2,
            HTTP_500,
            {"suspended": True},
            "deadline passed while suspended (spec.suspend) after 4 attempts; the last 2 failed, "
            "the last one: Transient: HTTP 500 from the endpoint",
        ),
        (
            0,
            0,
            None,
            {"not_sent": "Secret 'token' (header Authorization) was not found in namespace ns"},
            "deadline passed after 0 attempts; no request could be sent: "
            "Secret 'token' (header Authorization) was not found in namespace ns",
        ),
        # The deadline cut the last request short: the message is about the ones before it.
        (
            12,
            11,
            NAN_ERROR,
            {"cut_after": 0.0123456},
            f"deadline passed after 12 attempts, cutting the last one short after 12ms; "
            f"the 11 before it failed, the last one: InvalidResponse: {NAN_ERROR.message}",
        ),
        (
            3,
            1,
            HTTP_500,
            {"cut_after": 1.5},
            "deadline passed after 3 attempts, cutting the last one short after 1.5s; "
            "the one before it failed: Transient: HTTP 500 from the endpoint",
        ),
        (
            2,
            3,
            HTTP_500,
            {"cut_after": 1.5},
            "deadline passed after 2 attempts, cutting the last one short after 1.5s; "
            "3 errors in a row before it, the last one: Transient: HTTP 500 from the endpoint",
        ),
        (
            5,
            0,
            None,
            {"cut_after": 0.2},
            "deadline passed after 5 attempts, cutting the last one short after 200ms; "
            "the job was still running at the one before it",
        ),
        (
            1,
            0,
            None,
            {"cut_after": 60.0},
            "deadline passed after 1 attempt, cutting it short after 1m",
        ),
    ],
)
def test_deadline_exceeded_says_what_the_attempts_came_to(
    attempts: int, errors: int, last_error: LastError | None, extra: Any, message: str
) -> None:
    decision = deadline_exceeded(attempts, errors, last_error, **extra)
    assert decision == Decision(
        phase=Phase.TIMED_OUT,
        reason="DeadlineExceeded",
        message=message,
        consecutive_errors=errors,
        error=last_error,
        delay=None,
    )
    assert decision.finished


def test_deadline_exceeded_repeats_no_more_than_a_bounded_part_of_the_error() -> None:
    huge = LastError(ErrorClass.TRANSIENT, "x" * 100_000)
    decision = deadline_exceeded(7, 7, huge)
    assert decision.error == huge  # lastError keeps all of it
    assert len(decision.message) < 1200
    assert decision.message.endswith("…")


@pytest.mark.parametrize(
    ("left", "expected"), [(3600.0, 30.0), (30.0, 30.0), (12.5, 12.5), (0.0, 0.0), (-5.0, 0.0)]
)
def test_request_timeout_never_runs_past_the_deadline(left: float, expected: float) -> None:
    assert request_timeout(make_spec(), NOW, NOW + left) == expected


def timeout_after(seconds: float) -> RequestFailure:
    return RequestFailure(
        FailureKind.TRANSPORT, f"request timed out after {seconds}s", timed_out=True
    )


@pytest.mark.parametrize(
    ("left", "outcome", "cut_after"),
    [
        # The deadline gave the request less than requestTimeout (30s) and it ran out.
        (12.5, timeout_after(12.5), 12.5),
        (0.01, timeout_after(0.01), 0.01),
        # It had all of requestTimeout: a timeout of the endpoint's own, an error.
        (30.0, timeout_after(30), None),
        (3600.0, timeout_after(30), None),
        # Shortened, but it did not run out of time: what it says about the endpoint holds.
        (0.5, RequestFailure(FailureKind.TRANSPORT, "connection refused by 10.0.0.1:80"), None),
        (0.5, RequestFailure(FailureKind.INVALID_RESPONSE, "more than 5 redirects"), None),
        (0.5, resp(503), None),
    ],
)
def test_a_request_counts_as_cut_by_the_deadline_only_when_its_time_ran_out_early(
    left: float, outcome: Outcome, cut_after: float | None
) -> None:
    got = cut_by_deadline(make_spec(), outcome, NOW, NOW + left)
    assert got == (None if cut_after is None else pytest.approx(cut_after))


# --- helpers for the scheduler ---------------------------------------------------------------


def test_invalid_spec() -> None:
    message = 'spec.interval: "5 s" is not a duration (use Go form, e.g. 500ms, 5s, 1m30s)'
    assert invalid_spec(message) == Decision(
        phase=Phase.FAILED,
        reason="InvalidSpec",
        message=message,
        consecutive_errors=0,
        error=LastError(ErrorClass.PERMANENT, message),
        delay=None,
    )


@pytest.mark.parametrize("phase", [Phase.PENDING, Phase.POLLING])
@pytest.mark.parametrize("reason", ["SecretNotFound", "SecretNotAllowed"])
def test_waiting_keeps_the_phase_and_counts_no_error(phase: Phase, reason: str) -> None:
    message = 'Secret "token" is not labelled jobwatch.dev/allow-use: "true"'
    decision = waiting(
        make_spec(), phase, reason, message, now=NOW, deadline=LATER, rand=fixed(0.0)
    )
    assert decision == Decision(
        phase=phase, reason=reason, message=message, consecutive_errors=0, error=None, delay=4.5
    )
    assert not decision.finished


def test_waiting_ends_by_the_deadline() -> None:
    decision = waiting(
        make_spec(),
        Phase.POLLING,
        "SecretNotFound",
        "m",
        now=NOW,
        deadline=NOW + 2,
        rand=fixed(0.5),
    )
    assert decision.delay == 2.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("99999999999", 99999999999.0),
        (formatdate(NOW + 90, usegmt=True), 90.0),  # IMF-fixdate
        ("Friday, 15-Jan-27 08:00:30 GMT", 30.0),  # obsolete RFC 850 form
        ("Fri Jan 15 08:00:30 2027", 30.0),  # obsolete asctime form, UTC
        ("Fri, 15 Jan 2027 08:00:30 -0000", 30.0),
        ("Fri, 15 Jan 2027 10:00:30 +0200", 30.0),
        (formatdate(NOW - 1, usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


def test_retry_after_dates_without_a_zone_are_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after("Fri Jan 15 08:00:30 2027", NOW) == 30.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "1e3", "\u0661", "Fri, 15 Jan 2027"])
def test_parse_retry_after_rejects(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize(
    ("phase", "finished"),
    [
        (Phase.PENDING, False),
        (Phase.POLLING, False),
        (Phase.SUCCEEDED, True),
        (Phase.FAILED, True),
        (Phase.TIMED_OUT, True),
    ],
)
def test_finished_means_an_end_phase(phase: Phase, finished: bool) -> None:
    assert Decision(phase, "R", "m", 0, None, None).finished is finished
    assert (phase in END_PHASES) is finished


def test_wire_names() -> None:
    assert [p.value for p in Phase] == ["Pending", "Polling", "Succeeded", "Failed", "TimedOut"]
    assert [c.value for c in ErrorClass] == [
        "Transient",
        "InvalidResponse",
        "Permanent",
        "Internal",
    ]


def test_decide_is_deterministic_and_uses_only_the_given_random() -> None:
    calls: list[int] = []

    def rand() -> float:
        calls.append(1)
        return 0.25

    spec = make_spec()
    compiled = Cel().compile(spec)
    first = decide(spec, compiled, transport(), 0, now=NOW, deadline=LATER, rand=rand)
    second = decide(spec, compiled, transport(), 0, now=NOW, deadline=LATER, rand=rand)
    assert first == second
    assert first.delay == 6.25  # Full jitter: 5s + 0.25 * (10s - 5s)
    assert len(calls) == 2
