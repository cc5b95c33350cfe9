"""kstatus, the library behind Flux's health checks, on live JobWatches.

hack/tools/kstatus runs `sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute` on an object
read from the API server, so docs/api.md's kstatus table is checked against the real
library: Pending and Polling (suspended too) are InProgress, Succeeded is Current, Failed
and TimedOut are Failed, and a spec edit is InProgress until the operator has observed it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from gotools import build_tool
from harness import JobServer, Namespace, Operator, Reply, condition

PENDING = Reply(200, {"status": "PROCESSING"})
RULES = {
    "successWhen": 'response.body.status == "COMPLETED"',
    "failureWhen": 'response.body.status == "FAILED"',
}
MISSING_SECRET = [
    {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}
]


@pytest.fixture(scope="session")
def kstatus() -> str:
    """The kstatus program, built from hack/tools/kstatus (cached once built)."""
    return str(build_tool("kstatus"))


def compute(kstatus: str, obj: dict[str, Any] | None) -> dict[str, str]:
    assert obj is not None
    ran = subprocess.run(
        [kstatus], input=json.dumps(obj), capture_output=True, text=True, check=False, timeout=30
    )
    assert ran.returncode == 0, ran.stderr
    return dict(json.loads(ran.stdout))


def test_each_phase(kstatus: str, ns: Namespace, jobs: JobServer, operator: Operator) -> None:
    def watch(name: str, replies: list[Reply], **spec: Any) -> None:
        ns.create(
            name, {"url": jobs.script(f"/{name}", replies), "interval": "100ms", **RULES, **spec}
        )

    watch("pending", [PENDING], headers=MISSING_SECRET)
    watch("polling", [PENDING])
    watch("succeeded", [Reply(200, {"status": "COMPLETED"})])
    watch("failed", [Reply(200, {"status": "FAILED"})])
    watch("timedout", [PENDING], timeout="1s")
    watch("suspended", [PENDING], suspend=True)
    statuses = {
        "pending": ns.wait_status(
            "pending", lambda s: s.get("reason") == "SecretNotFound", 10, "SecretNotFound"
        ),
        "polling": ns.wait_phase("polling", "Polling"),
        "succeeded": ns.wait_phase("succeeded", "Succeeded"),
        "failed": ns.wait_phase("failed", "Failed"),
        "timedout": ns.wait_phase("timedout", "TimedOut"),
        "suspended": ns.wait_status(
            "suspended",
            lambda s: condition(s, "Reconciling").get("reason") == "Suspended",
            10,
            "the suspension to show",
        ),
    }
    assert statuses["pending"]["phase"] == "Pending"

    def message(name: str, kind: str) -> str:
        return str(condition(statuses[name], kind)["message"])

    expected = {
        "pending": {"status": "InProgress", "message": message("pending", "Reconciling")},
        "polling": {"status": "InProgress", "message": message("polling", "Reconciling")},
        "succeeded": {"status": "Current", "message": "Resource is Ready"},
        "failed": {"status": "Failed", "message": message("failed", "Stalled")},
        "timedout": {"status": "Failed", "message": message("timedout", "Stalled")},
        "suspended": {"status": "InProgress", "message": message("suspended", "Reconciling")},
    }
    # Each object is read again, whole: a later status write keeps the phase waited for.
    computed = {name: compute(kstatus, ns.get(name)) for name in expected}
    assert computed == expected


def test_spec_edit_is_in_progress_until_observed(
    kstatus: str, ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/edited", [Reply(200, {"status": "COMPLETED"})])
    ns.create("edited", {"url": url, **RULES})
    ns.wait_phase("edited", "Succeeded")
    assert compute(kstatus, ns.get("edited"))["status"] == "Current"

    operator.stop()  # so that nothing observes the edit
    ns.patch_spec("edited", {"timeout": "20m"})
    edited = ns.get("edited")
    assert edited is not None
    assert (edited["metadata"]["generation"], edited["status"]["observedGeneration"]) == (2, 1)
    assert edited["status"]["phase"] == "Succeeded"
    assert compute(kstatus, edited) == {
        "status": "InProgress",
        "message": "JobWatch generation is 2, but latest observed generation is 1",
    }


def test_a_jobwatch_no_operator_has_seen_is_in_progress(kstatus: str, ns: Namespace) -> None:
    """Without a status kstatus would call it Current ("Resource is current"), and a Flux
    `wait` right after an apply would pass before the watch started: the CRD defaults
    `status.observedGeneration` to 0, behind `metadata.generation`."""
    ns.create("unseen", {"url": "http://jobs.invalid/x"})  # no operator runs in this test
    unseen = ns.get("unseen")
    assert unseen is not None
    assert unseen["status"] == {"observedGeneration": 0}
    assert compute(kstatus, unseen) == {
        "status": "InProgress",
        "message": "JobWatch generation is 1, but latest observed generation is 0",
    }
