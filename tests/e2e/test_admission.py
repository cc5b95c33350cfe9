"""Admission: `kubectl apply` rejects bad JobWatches with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from harness import Namespace

GOOD = {"url": "http://jobs.example.com/api/jobs/1/status"}

REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("no url", {}, "spec.url"),
    ("ftp url", {"url": "ftp://example.com/x"}, "spec.url"),
    ("not a url", {"url": "just words"}, "spec.url"),
    ("method enum", {**GOOD, "method": "DELETE"}, "spec.method"),
    ("jitter enum", {**GOOD, "backoff": {"jitter": "Some"}}, "spec.backoff.jitter"),
    ("factor below 1", {**GOOD, "backoff": {"factor": 0.5}}, "spec.backoff.factor"),
    ("bad duration", {**GOOD, "interval": "5 seconds"}, "spec.interval"),
    ("bad timeout", {**GOOD, "timeout": "ten minutes"}, "spec.timeout"),
    ("bad requestTimeout", {**GOOD, "requestTimeout": "30"}, "spec.requestTimeout"),
    ("bad maxInterval", {**GOOD, "backoff": {"maxInterval": "1 m"}}, "spec.backoff.maxInterval"),
    ("interval too short", {**GOOD, "interval": "10ms"}, "spec.interval"),
    ("timeout too short", {**GOOD, "timeout": "500ms", "interval": "100ms"}, "spec.timeout"),
    ("timeout too long", {**GOOD, "timeout": "169h"}, "spec.timeout"),
    ("timeout below interval", {**GOOD, "timeout": "2s", "interval": "5s"}, "timeout"),
    ("body with GET", {**GOOD, "body": "{}"}, "body"),
    ("negative errors", {**GOOD, "maxConsecutiveErrors": -1}, "spec.maxConsecutiveErrors"),
    ("negative ttl", {**GOOD, "ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ("ttl past int32", {**GOOD, "ttlSecondsAfterFinished": 2**31}, "spec.ttlSecondsAfterFinished"),
    (
        "ttl not an integer",
        {**GOOD, "ttlSecondsAfterFinished": 1.5},
        "spec.ttlSecondsAfterFinished",
    ),
    (
        "ttl as a duration",
        {**GOOD, "ttlSecondsAfterFinished": "1h"},
        "spec.ttlSecondsAfterFinished",
    ),
    ("status code range", {**GOOD, "permanentStatusCodes": [99]}, "spec.permanentStatusCodes"),
    ("header without value", {**GOOD, "headers": [{"name": "X-A"}]}, "spec.headers[0]"),
    (
        "header with both",
        {
            **GOOD,
            "headers": [
                {
                    "name": "X-A",
                    "value": "v",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ],
        },
        "spec.headers[0]",
    ),
    (
        "secretKeyRef without key",
        {**GOOD, "headers": [{"name": "X-A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
        "key",
    ),
]


def apply(ns: Namespace, spec: dict[str, Any], name: str = "bad") -> tuple[int, str]:
    manifest = {
        "apiVersion": "jobwatch.dev/v1alpha1",
        "kind": "JobWatch",
        "metadata": {"name": name, "namespace": ns.name},
        "spec": spec,
    }
    result = ns.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(("case", "spec", "field"), REJECTED, ids=[r[0] for r in REJECTED])
def test_bad_spec_is_rejected_naming_the_field(
    ns: Namespace, case: str, spec: dict[str, Any], field: str
) -> None:
    code, output = apply(ns, spec)
    assert code != 0, f"{case}: accepted"
    assert "invalid" in output.lower() or "required" in output.lower(), output
    assert field in output, output
    assert ns.get("bad") is None


def test_defaults_are_filled_in(ns: Namespace) -> None:
    code, output = apply(ns, GOOD, "defaults")
    assert code == 0, output
    spec = (ns.get("defaults") or {})["spec"]
    assert spec["method"] == "GET"
    assert spec["timeout"] == "10m"
    assert spec["interval"] == "5s"
    assert spec["requestTimeout"] == "30s"
    assert spec["backoff"] == {"factor": 2, "maxInterval": "1m", "jitter": "Full"}
    assert spec["successWhen"] == "response.code >= 200 && response.code < 300"
    assert spec["failureWhen"] == "false"
    assert spec["permanentStatusCodes"] == [400, 401, 403, 404, 405, 410, 422]
    assert spec["maxConsecutiveErrors"] == 0
    assert spec["suspend"] is False
    assert "ttlSecondsAfterFinished" not in spec  # nothing is deleted unless asked


def test_valid_spec_with_every_field_is_accepted(ns: Namespace) -> None:
    spec = {
        "url": "https://jobs.example.com:8443/api/jobs/1/status",
        "method": "POST",
        "headers": [
            {"name": "Content-Type", "value": "application/json"},
            {
                "name": "Authorization",
                "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}},
            },
        ],
        "body": '{"id": 1}',
        "timeout": "1h30m",
        "interval": "500ms",
        "requestTimeout": "10s",
        "backoff": {"factor": 1.5, "maxInterval": "2m", "jitter": "Equal"},
        "successWhen": 'response.body.status == "COMPLETED"',
        "failureWhen": 'response.body.status == "FAILED"',
        "result": {"link": "response.body.resultLink"},
        "permanentStatusCodes": [400, 404],
        "maxConsecutiveErrors": 5,
        "suspend": True,
        "tls": {"insecureSkipVerify": False, "caSecretRef": {"name": "ca", "key": "ca.crt"}},
        "ttlSecondsAfterFinished": 2**31 - 1,
    }
    code, output = apply(ns, spec, "full")
    assert code == 0, output


@pytest.mark.parametrize(
    ("ttl", "says"),
    [
        (-1, "should be greater than or equal to 0"),
        (2**31, "should be less than or equal to 2147483647"),
        ("1h", "must be of type integer"),
        (1.5, "must be of type integer"),
    ],
)
def test_a_bad_ttl_is_rejected_with_a_clear_message(ns: Namespace, ttl: object, says: str) -> None:
    code, output = apply(ns, {**GOOD, "ttlSecondsAfterFinished": ttl})
    assert code != 0, output
    # The field, what is wrong with it, in the API server's own words.
    assert "spec.ttlSecondsAfterFinished: Invalid value" in output, output
    assert f"spec.ttlSecondsAfterFinished in body {says}" in output, output
    assert ns.get("bad") is None


@pytest.mark.parametrize("ttl", [0, 1, 86400])
def test_a_ttl_is_accepted_and_kept_as_written(ns: Namespace, ttl: int) -> None:
    code, output = apply(ns, {**GOOD, "ttlSecondsAfterFinished": ttl}, f"ttl-{ttl}")
    assert code == 0, output
    assert (ns.get(f"ttl-{ttl}") or {})["spec"]["ttlSecondsAfterFinished"] == ttl


def test_explain_documents_the_fields(ns: Namespace) -> None:
    explained = ns.cluster.kubectl("explain", "jobwatch.spec.backoff")
    assert explained.returncode == 0, explained.stderr
    for field in ("factor", "maxInterval", "jitter"):
        assert field in explained.stdout
    assert "DESCRIPTION" in explained.stdout
