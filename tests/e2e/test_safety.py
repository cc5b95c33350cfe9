"""Safety rules (API.md): Secret opt-in and rotation, egress guard, body cap, no leaks."""

from __future__ import annotations

import json

from conftest import OperatorFactory
from harness import JobServer, Namespace, Operator, Reply, wait_for

ALLOW = {"jobwatch.dev/allow-use": "true"}
TOKEN_1 = "s3cr3t-token-one-7f2a"
TOKEN_2 = "s3cr3t-token-two-91bc"


def bearer_spec(url: str) -> dict[str, object]:
    return {
        "url": url,
        "interval": "200ms",
        "successWhen": 'response.body.status == "COMPLETED"',
        "headers": [
            {
                "name": "Authorization",
                "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}},
            }
        ],
    }


def everything_published(ns: Namespace, name: str) -> str:
    events = [(e.reason, e.message) for e in ns.events(name)]
    return json.dumps(ns.get(name)) + json.dumps(events)


# Secret reads are cached (JOBWATCH_SECRET_TTL, 10 s by default): these tests shorten it.
SHORT_SECRET_TTL = {"JOBWATCH_SECRET_TTL": "1s"}


def test_secret_without_opt_in_label_is_not_used_until_labelled(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    start_operator(**SHORT_SECRET_TTL)
    ns.secret("api-token", {"token": f"Bearer {TOKEN_1}"})
    url = jobs.script("/private", [Reply(200, {"status": "PROCESSING"})])
    ns.create("private", bearer_spec(url))
    status = ns.wait_status(
        "private", lambda s: s.get("reason") == "SecretNotAllowed", 10, "SecretNotAllowed"
    )
    assert status["phase"] == "Pending"
    assert "api-token" in status["message"]
    assert jobs.seen("/private") == []

    ns.secret("api-token", {"token": f"Bearer {TOKEN_1}"}, labels=ALLOW)
    wait_for(lambda: jobs.seen("/private"), 10, "a request once the Secret is labelled")
    assert jobs.seen("/private")[0].headers["authorization"] == f"Bearer {TOKEN_1}"
    ns.wait_phase("private", "Polling")


def test_missing_secret_waits_then_is_picked_up(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/later", [Reply(200, {"status": "COMPLETED"})])
    ns.create("later", bearer_spec(url))
    status = ns.wait_status(
        "later", lambda s: s.get("reason") == "SecretNotFound", 10, "SecretNotFound"
    )
    assert "api-token" in status["message"]
    assert jobs.seen("/later") == []
    ns.secret("api-token", {"token": f"Bearer {TOKEN_1}"}, labels=ALLOW)
    ns.wait_phase("later", "Succeeded")


def test_secret_rotation_is_used_within_the_ttl_and_never_published(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    operator = start_operator(**SHORT_SECRET_TTL)
    ns.secret("api-token", {"token": f"Bearer {TOKEN_1}"}, labels=ALLOW)
    url = jobs.script("/rotating", [Reply(200, {"status": "PROCESSING"})])
    ns.create("rotating", bearer_spec(url))
    wait_for(lambda: jobs.seen("/rotating"), 10, "a first request")
    ns.secret("api-token", {"token": f"Bearer {TOKEN_2}"}, labels=ALLOW)
    wait_for(
        lambda: jobs.seen("/rotating")[-1].headers["authorization"] == f"Bearer {TOKEN_2}",
        10,
        "a request with the rotated token",
    )
    ns.wait_status("rotating", lambda s: s.get("attempts", 0) >= 3, 10, "attempts recorded")
    published = everything_published(ns, "rotating") + operator.logs()
    for token in (TOKEN_1, TOKEN_2):
        assert token not in published


def test_egress_to_a_denied_range_fails_after_dns_resolution(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    # `localhost` is a name: only the resolved address shows it is denied.
    start_operator(JOBWATCH_EGRESS_DENY="127.0.0.0/8,::1/128")
    jobs.script("/internal", [Reply(200, {"status": "COMPLETED"})])
    ns.create("internal", {"url": f"http://localhost:{jobs.port}/internal"})
    status = ns.wait_phase("internal", "Failed")
    assert status["reason"] == "EgressDenied"
    assert jobs.seen("/internal") == []


def test_redirect_to_a_denied_address_is_refused(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    start_operator(JOBWATCH_EGRESS_DENY="127.0.0.2/32")
    jobs.script("/target", [Reply(200, {"status": "COMPLETED"})])
    url = jobs.script(
        "/hop", [Reply(302, "", {"Location": f"http://127.0.0.2:{jobs.port}/target"})]
    )
    ns.create("hop", {"url": url})
    status = ns.wait_phase("hop", "Failed")
    assert status["reason"] == "EgressDenied"
    assert len(jobs.seen("/hop")) == 1
    assert jobs.seen("/target") == []


def test_redirects_are_followed(ns: Namespace, jobs: JobServer, operator: Operator) -> None:
    jobs.script("/final", [Reply(200, {"status": "COMPLETED"})])
    url = jobs.script("/moved", [Reply(301, "", {"Location": "/final"})])
    ns.create("moved", {"url": url})
    ns.wait_phase("moved", "Succeeded")
    assert len(jobs.seen("/final")) == 1


def test_body_over_the_cap_is_an_invalid_response(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    start_operator(JOBWATCH_MAX_BODY_BYTES="2048")
    url = jobs.script("/huge", [Reply(200, {"status": "COMPLETED", "pad": "x" * 4096})])
    ns.create("huge", {"url": url, "interval": "100ms"})
    status = ns.wait_status("huge", lambda s: s.get("lastError"), 10, "an error")
    assert status["phase"] == "Polling"
    assert status["lastError"]["class"] == "InvalidResponse"
    assert "exceeds" in status["lastError"]["message"]


def test_last_response_body_in_status_is_cut_to_1kib(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/big", [Reply(200, {"status": "PROCESSING", "pad": "y" * 5000})])
    ns.create(
        "big",
        {"url": url, "interval": "100ms", "successWhen": 'response.body.status == "COMPLETED"'},
    )
    status = ns.wait_status("big", lambda s: s.get("lastResponse"), 10, "a response")
    assert len(status["lastResponse"]["body"].encode()) <= 1024
