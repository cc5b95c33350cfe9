"""The shipped manifests: least-privilege RBAC and a locked-down Deployment.

RBAC is also exercised for real: every e2e test runs the operator with a token of
exactly this ServiceAccount. These checks catch what a passing run cannot: a rule
that is more than the operator needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def load(path: str) -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / path).read_text()))


def test_cluster_role_has_no_wildcards_and_only_gets_secrets() -> None:
    rules = load("manifests/rbac/role.yaml")["rules"]
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
    grants = {
        (group, resource): set(rule["verbs"])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert grants[("", "secrets")] == {"get"}
    # delete: only for spec.ttlSecondsAfterFinished (a uid-precondition DELETE of a
    # finished JobWatch); still never create, update or patch of the main resource.
    assert grants[("jobwatch.dev", "jobwatches")] == {"get", "list", "watch", "delete"}
    assert grants[("jobwatch.dev", "jobwatches/status")] <= {"get", "patch", "update"}
    assert set(grants) <= {
        ("", "secrets"),
        ("", "events"),
        ("events.k8s.io", "events"),
        ("jobwatch.dev", "jobwatches"),
        ("jobwatch.dev", "jobwatches/status"),
    }


def test_leases_are_granted_only_in_the_operators_namespace() -> None:
    role, binding = yaml.safe_load_all((REPO / "manifests/rbac/lease_role.yaml").read_text())
    assert (role["kind"], role["metadata"]["namespace"]) == ("Role", "jobwatch-system")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "create", "update", "delete"],
        }
    ]
    assert binding["kind"] == "RoleBinding"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "jobwatch-operator", "namespace": "jobwatch-system"}
    ]


def test_deployment_runs_locked_down() -> None:
    deployment = load("manifests/manager/deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The operator exits within its 10 s shutdown budget; the pod must allow that.
    assert pod["terminationGracePeriodSeconds"] >= 10
    # Replicas share the fleet through Leases; a rollout surges before it stops one.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["JOBWATCH_LEASE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.namespace"
    )


def test_crd_names_and_printer_columns() -> None:
    crd = load("crds/jobwatch.dev_jobwatches.yaml")
    assert crd["spec"]["names"]["shortNames"] == ["jw"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]]
    # The default columns are the API's; Completed and TTL only with -o wide.
    assert columns == [
        ("Phase", 0),
        ("Attempts", 0),
        ("Reason", 0),
        ("Age", 0),
        ("Completed", 1),
        ("TTL", 1),
        ("URL", 1),
    ]
    paths = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert paths["Completed"] == ".status.completionTime"
    assert paths["TTL"] == ".spec.ttlSecondsAfterFinished"


def test_crd_bounds_the_ttl_as_a_job_does() -> None:
    crd = load("crds/jobwatch.dev_jobwatches.yaml")
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    ttl = spec["properties"]["ttlSecondsAfterFinished"]
    assert {k: ttl[k] for k in ("type", "format", "minimum", "maximum")} == {
        "type": "integer",
        "format": "int32",
        "minimum": 0,
        "maximum": 2**31 - 1,
    }
    assert "default" not in ttl  # nothing is deleted unless a user asks
