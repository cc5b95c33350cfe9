"""What one attempt decides (API.md), observed through the real API server."""

from __future__ import annotations

import datetime

import pytest
from harness import JobServer, Namespace, Operator, Reply, condition, gaps, wait_for

PROCESSING = Reply(200, {"status": "PROCESSING"})
BODY_RULES = {
    "successWhen": 'response.body.status == "COMPLETED"',
    "failureWhen": 'response.body.status == "FAILED"',
}


def parse(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts).timestamp()


def test_success_reports_result_conditions_and_event(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script(
        "/api/jobs/42/status",
        [
            Reply(200, {"status": "QUEUED"}),
            PROCESSING,
            Reply(200, {"status": "COMPLETED", "resultLink": "https://r/42.pdf", "message": "ok"}),
        ],
    )
    ns.create(
        "report-42",
        {
            "url": url,
            "interval": "200ms",
            **BODY_RULES,
            "result": {"link": "response.body.resultLink", "message": "response.body.message"},
        },
    )
    status = ns.wait_phase("report-42", "Succeeded")
    assert status["reason"] == "SuccessConditionMet"
    assert status["attempts"] == 3
    assert status["result"] == {"link": "https://r/42.pdf", "message": "ok"}
    assert status["lastResponse"]["code"] == 200
    assert "COMPLETED" in status["lastResponse"]["body"]
    assert status["observedGeneration"] == 1
    assert parse(status["completionTime"]) >= parse(status["startTime"])
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Finished")["status"] == "True"
    assert condition(status, "Reconciling")["status"] == "False"
    assert condition(status, "Stalled")["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert len(jobs.seen("/api/jobs/42/status")) == 3
    wait_for(
        lambda: any(e.reason == "SuccessConditionMet" for e in ns.events("report-42")),
        10,
        "a SuccessConditionMet event",
    )
    waited = ns.cluster.kubectl(
        "wait", "-n", ns.name, "--for=condition=Finished", "--timeout=5s", "jw/report-42"
    )
    assert waited.returncode == 0, waited.stderr
    ready = ns.cluster.kubectl(
        "wait", "-n", ns.name, "--for=condition=Ready", "--timeout=5s", "jw/report-42"
    )
    assert ready.returncode == 0, ready.stderr


def test_without_result_the_final_json_body_is_the_result(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/done", [Reply(200, {"status": "COMPLETED", "rows": 12})])
    ns.create("plain", {"url": url})
    status = ns.wait_phase("plain", "Succeeded")
    assert status["result"] == {"status": "COMPLETED", "rows": 12}


def test_failure_condition_fails_the_watch(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/j", [PROCESSING, Reply(200, {"status": "FAILED", "message": "oom"})])
    ns.create(
        "fails",
        {"url": url, "interval": "100ms", **BODY_RULES, "result": {"why": "response.body.message"}},
    )
    status = ns.wait_phase("fails", "Failed")
    assert status["reason"] == "FailureConditionMet"
    assert status["result"] == {"why": "oom"}
    assert condition(status, "Stalled")["status"] == "True"
    assert condition(status, "Finished")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"
    waited = ns.cluster.kubectl(
        "wait", "-n", ns.name, "--for=condition=Finished", "--timeout=5s", "jw/fails"
    )
    assert waited.returncode == 0, waited.stderr
    wait_for(
        lambda: any(
            e.reason == "FailureConditionMet" and e.type == "Warning" for e in ns.events("fails")
        ),
        10,
        "a Warning event FailureConditionMet",
    )


def test_permanent_status_code_fails_after_one_attempt(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script(
        "/gone", [Reply(404, "<html>not found</html>", {"content-type": "text/html"})]
    )
    ns.create("missing", {"url": url, "interval": "100ms", **BODY_RULES})
    status = ns.wait_phase("missing", "Failed")
    assert status["reason"] == "PermanentHTTPError"
    assert status["attempts"] == 1
    assert status["lastError"]["class"] == "Permanent"
    assert len(jobs.seen("/gone")) == 1


def test_retry_after_sets_the_next_delay(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script(
        "/busy",
        [
            Reply(503, {"error": "busy"}, {"Retry-After": "2"}),
            Reply(200, {"status": "COMPLETED"}),
        ],
    )
    ns.create(
        "busy", {"url": url, "interval": "100ms", "backoff": {"jitter": "None"}, **BODY_RULES}
    )
    ns.wait_phase("busy", "Succeeded")
    (gap,) = gaps(jobs.seen("/busy"))
    # Without Retry-After the backoff would have waited 200ms.
    assert 1.9 <= gap <= 3.0, gap


def test_retry_after_http_date_is_clamped_to_max_interval(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    url = jobs.script(
        "/limited",
        [
            Reply(429, {}, {"Retry-After": later.strftime("%a, %d %b %Y %H:%M:%S GMT")}),
            Reply(200, {"status": "COMPLETED"}),
        ],
    )
    ns.create(
        "limited",
        {
            "url": url,
            "interval": "100ms",
            "backoff": {"jitter": "None", "maxInterval": "1s"},
            **BODY_RULES,
        },
    )
    ns.wait_phase("limited", "Succeeded")
    (gap,) = gaps(jobs.seen("/limited"))
    assert 0.9 <= gap <= 2.0, gap


def test_backoff_grows_by_factor_after_errors_and_resets(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script(
        "/flaky",
        [
            Reply(500),
            Reply(500),
            Reply(500),
            PROCESSING,
            PROCESSING,
            Reply(200, {"status": "COMPLETED"}),
        ],
    )
    ns.create(
        "flaky",
        {
            "url": url,
            "interval": "200ms",
            "backoff": {"factor": 2, "jitter": "None", "maxInterval": "1s"},
            **BODY_RULES,
        },
    )
    ns.wait_phase("flaky", "Succeeded", timeout=30)
    observed = gaps(jobs.seen("/flaky"))
    # 200ms x 2^1, x 2^2, x 2^3 capped at 1s; then pending resets to the interval.
    expected = [0.4, 0.8, 1.0, 0.2, 0.2]
    assert len(observed) == len(expected)
    for got, want in zip(observed, expected, strict=True):
        assert want - 0.05 <= got <= want + 0.35, (observed, expected)


def test_transient_errors_are_reported_while_polling(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/down", [Reply(502, "bad gateway", {"content-type": "text/plain"})])
    ns.create("down", {"url": url, "interval": "100ms", "backoff": {"maxInterval": "200ms"}})
    status = ns.wait_status(
        "down", lambda s: s.get("consecutiveErrors", 0) >= 2, 10, "two errors in a row"
    )
    assert status["phase"] == "Polling"
    assert status["lastError"]["class"] == "Transient"
    assert "502" in status["lastError"]["message"]
    assert condition(status, "Reconciling")["status"] == "True"


def test_too_many_consecutive_errors_fail_the_watch(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/broken", [Reply(500)])
    ns.create(
        "broken",
        {
            "url": url,
            "interval": "100ms",
            "maxConsecutiveErrors": 3,
            "backoff": {"maxInterval": "200ms"},
        },
    )
    status = ns.wait_phase("broken", "Failed")
    assert status["reason"] == "TooManyErrors"
    assert status["attempts"] == 3
    assert len(jobs.seen("/broken")) == 3


def test_deadline_times_out_and_no_request_follows(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/slow-job", [PROCESSING])
    ns.create("late", {"url": url, "interval": "300ms", "timeout": "2s", **BODY_RULES})
    status = ns.wait_phase("late", "TimedOut")
    assert status["reason"] == "DeadlineExceeded"
    deadline = parse(status["deadline"])
    assert abs(deadline - parse(status["startTime"]) - 2.0) < 0.01
    assert parse(status["completionTime"]) >= deadline
    assert condition(status, "Stalled")["status"] == "True"
    count = len(jobs.seen("/slow-job"))
    assert 4 <= count <= 9
    assert ns.status("late")["attempts"] == count


def test_expression_that_cannot_be_evaluated_is_invalid_response(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script(
        "/html", [Reply(200, "<html>maintenance</html>", {"content-type": "text/html"})]
    )
    ns.create("html", {"url": url, "interval": "100ms", **BODY_RULES})
    status = ns.wait_status("html", lambda s: s.get("lastError"), 10, "an error")
    assert status["phase"] == "Polling"
    assert status["lastError"]["class"] == "InvalidResponse"
    assert "maintenance" in status["lastError"]["message"]


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [("response.code ==", "syntax error"), ("response.code", "must evaluate to a bool")],
)
def test_invalid_expression_fails_without_a_request(
    ns: Namespace, jobs: JobServer, operator: Operator, expression: str, complaint: str
) -> None:
    url = jobs.script("/never", [PROCESSING])
    ns.create("bad-cel", {"url": url, "successWhen": expression})
    status = ns.wait_phase("bad-cel", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "successWhen" in status["message"]
    assert complaint in status["message"]
    assert status["attempts"] == 0
    assert jobs.seen("/never") == []


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_method_and_body_are_sent(
    ns: Namespace, jobs: JobServer, operator: Operator, method: str
) -> None:
    url = jobs.script("/submit", [Reply(200, {"status": "COMPLETED"})])
    ns.create(
        "submit",
        {
            "url": url,
            "method": method,
            "body": '{"job": 42}',
            "headers": [{"name": "Content-Type", "value": "application/json"}],
        },
    )
    ns.wait_phase("submit", "Succeeded")
    (seen,) = jobs.seen("/submit")
    assert seen.method == method
    assert seen.body == b'{"job": 42}'
    assert seen.headers["content-type"] == "application/json"
