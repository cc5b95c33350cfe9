"""Hostile tenants, end to end: what one JobWatch or its endpoint does stays with that
watch, which says what went wrong in its status, and every other watch carries on.

The seams inside the operator are made to fail one by one in tests/unit/test_isolation.py,
test_poller.py and test_intake.py; here are the cases a tenant can cause from outside,
through the real API server.
"""

from __future__ import annotations

import pytest
from conftest import OperatorFactory
from harness import JobServer, Namespace, Operator, Reply, gaps, wait_for

DONE = Reply(200, {"status": "COMPLETED"})
RUNNING = Reply(200, {"status": "RUNNING"})
BODY_RULES = {"successWhen": 'response.body.status == "COMPLETED"'}


def test_a_url_python_cannot_parse_fails_alone_and_blinds_nobody(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    """`http://a]b/` passes the API server's isURL() (Go's URL parser) but not Python's.
    It used to raise in the informer: no JobWatch created after it was ever seen."""
    ns.create("odd", {"url": "http://a]b/status"})
    ns.create("before", {"url": jobs.script("/before", [DONE])})
    operator = start_operator()
    status = ns.wait_phase("odd", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "spec.url" in status["message"]
    ns.wait_phase("before", "Succeeded")
    ns.create("after", {"url": jobs.script("/after", [DONE])})  # from the live stream
    ns.wait_phase("after", "Succeeded")
    assert operator.process is not None and operator.process.poll() is None


def test_retry_after_zero_is_no_hot_loop(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/busy", [Reply(429, {}, {"Retry-After": "0"})])
    ns.create("busy", {"url": url, "interval": "500ms", "timeout": "3s"})
    ns.wait_phase("busy", "TimedOut", timeout=15)
    seen = jobs.seen("/busy")
    assert 2 <= len(seen) <= 7, len(seen)  # 3 s at one request per 500 ms at most
    assert min(gaps(seen)) >= 0.45, gaps(seen)


def test_a_big_deciding_body_still_gives_its_result(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    body = {"status": "COMPLETED", "link": "s3://bucket/r.csv", "log": "x" * 100_000}
    url = jobs.script("/big", [Reply(200, body)])
    ns.create("big", {"url": url, **BODY_RULES, "result": {"link": "response.body.link"}})
    status = ns.wait_phase("big", "Succeeded")
    assert status["result"] == {"link": "s3://bucket/r.csv"}
    assert len(status["lastResponse"]["body"]) <= 1024


def test_a_final_body_with_nan_is_written(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/nan", [Reply(200, '{"status": "COMPLETED", "score": NaN, "n": 1e400}')])
    ns.create("nan", {"url": url})  # default successWhen: any 2xx
    status = ns.wait_phase("nan", "Succeeded")
    assert status["reason"] == "SuccessConditionMet"


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"status": NaN}', '{"status": 1' + "0" * 5000 + "}"],
    ids=["deep", "nan", "huge-number"],
)
def test_a_hostile_body_is_an_invalid_response_until_the_deadline(
    ns: Namespace, jobs: JobServer, operator: Operator, text: str
) -> None:
    url = jobs.script("/hostile", [Reply(200, text)])
    ns.create("hostile", {"url": url, "interval": "200ms", "timeout": "3s", **BODY_RULES})
    seen = ns.wait_status(
        "hostile",
        lambda s: (s.get("lastError") or {}).get("class") == "InvalidResponse",
        15,
        "an InvalidResponse error",
    )
    assert seen["phase"] == "Polling"
    status = ns.wait_phase("hostile", "TimedOut", timeout=15)
    assert status["reason"] == "DeadlineExceeded"


def test_an_edit_during_a_request_never_doubles_it(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/slow", [Reply(200, {"status": "RUNNING"}, delay=1.5), RUNNING])
    ns.create("slow", {"url": url, "interval": "1s", **BODY_RULES})
    wait_for(lambda: jobs.seen("/slow") or None, 10, "the first request")
    ns.patch_spec("slow", {"suspend": True})  # mid-request: suspend, then resume
    ns.patch_spec("slow", {"suspend": False})
    wait_for(lambda: len(jobs.seen("/slow")) >= 3 or None, 15, "three requests")
    # The first request took 1.5 s to answer: the next may start only after it ended,
    # and then no sooner than 0.9 x interval.
    assert gaps(jobs.seen("/slow"))[0] >= 1.5 + 0.9, gaps(jobs.seen("/slow"))


def test_an_invalid_spec_end_is_final_across_restarts(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    ns.create("broken", {"url": jobs.url("/x"), "successWhen": "response.code =="})
    operator = start_operator()
    first = ns.wait_phase("broken", "Failed")
    assert first["reason"] == "InvalidSpec"
    wait_for(lambda: ns.events("broken") or None, 10, "the InvalidSpec event")
    operator.stop()
    start_operator()
    # Once a watch created after the restart has ended, the listing has been taken in.
    ns.create("marker", {"url": jobs.script("/marker", [DONE])})
    ns.wait_phase("marker", "Succeeded")
    again = ns.status("broken")
    assert again["completionTime"] == first["completionTime"]
    assert len([e for e in ns.events("broken") if e.reason == "InvalidSpec"]) == 1
