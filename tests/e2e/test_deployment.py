"""manifests/ as a user installs it: the Deployment admitted under Pod Security
`restricted`, and the operator's ServiceAccount allowed exactly what the RBAC promises."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import OPERATOR_NAMESPACE, OPERATOR_SA
from harness import REPO, Cluster, Namespace, wait_for

SA = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
# A ServiceAccount with no binding: what any ServiceAccount may do on this cluster.
BASELINE_SA = f"system:serviceaccount:{OPERATOR_NAMESPACE}:jobwatch-e2e-nobody"
DEPLOYMENT = "jobwatch-operator"
SELECTOR = "app.kubernetes.io/name=jobwatch,app.kubernetes.io/component=operator"
# manifests/rbac/role.yaml, as (resource as `can-i --list` names it, verb).
PROMISED = {
    *(("jobwatches.jobwatch.dev", verb) for verb in ("get", "list", "watch", "delete")),
    *(("jobwatches.jobwatch.dev/status", verb) for verb in ("get", "patch", "update")),
    ("secrets", "get"),
    *(("events", verb) for verb in ("create", "patch")),
    *(("events.events.k8s.io", verb) for verb in ("create", "patch")),
}
ROW = re.compile(
    r"^(?P<resource>\S*)\s+\[(?P<urls>[^\]]*)\]\s+\[(?P<names>[^\]]*)\]\s+\[(?P<verbs>[^\]]*)\]\s*$"
)


def kubectl_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    got = cluster.kubectl(*args, "-o", "json")
    assert got.returncode == 0, got.stderr
    return dict(json.loads(got.stdout))


def operator_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return list(
        kubectl_json(cluster, "get", "pods", "-n", OPERATOR_NAMESPACE, "-l", SELECTOR)["items"]
    )


@pytest.fixture
def deployed(installed: Cluster) -> Iterator[Cluster]:
    """`kubectl apply -k manifests/`, Deployment included; deleted after the test."""
    if installed.directory is None:
        # On a real cluster the Deployment would replace (or start) a running operator.
        pytest.skip("JOBWATCH_E2E_EXISTING_CLUSTER=1: not applying a Deployment to this cluster")
    applied = installed.kubectl("apply", "-k", str(REPO / "manifests"))
    assert applied.returncode == 0, applied.stderr
    try:
        yield installed
    finally:
        deleted = installed.kubectl(
            "delete", "deployment", DEPLOYMENT, "-n", OPERATOR_NAMESPACE, "--ignore-not-found"
        )
        assert deleted.returncode == 0, deleted.stderr
        # The garbage collector removes the ReplicaSet and its Pod (never bound to a node,
        # so deleted at once): no second operator is left for the other tests.
        wait_for(lambda: not operator_pods(installed), 60, "the operator Pod to be deleted")


def test_the_deployment_is_admitted_under_pod_security_restricted(deployed: Cluster) -> None:
    namespace = kubectl_json(deployed, "get", "namespace", OPERATOR_NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Pod Security admission is enforcing here: a Pod without the restricted settings is refused.
    probe = deployed.kubectl(
        "run", "psa-probe", "-n", OPERATOR_NAMESPACE, "--image=busybox", "--dry-run=server"
    )
    assert probe.returncode != 0 and "violates PodSecurity" in probe.stderr, probe

    def pod() -> dict[str, Any] | None:
        pods = operator_pods(deployed)
        return pods[0] if pods else None

    def why_not() -> str:
        # kube-controller-manager records a refused Pod on the ReplicaSet.
        sets = kubectl_json(
            deployed, "get", "replicasets", "-n", OPERATOR_NAMESPACE, "-l", SELECTOR
        )
        return json.dumps([rs.get("status") for rs in sets["items"]])

    try:
        created = wait_for(pod, 60, "kube-controller-manager to create the operator Pod")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nReplicaSets: {why_not()}") from None
    [owner] = created["metadata"]["ownerReferences"]
    assert owner["kind"] == "ReplicaSet"
    replica_set = kubectl_json(
        deployed, "get", "replicaset", owner["name"], "-n", OPERATOR_NAMESPACE
    )
    assert replica_set["metadata"]["ownerReferences"][0]["name"] == DEPLOYMENT
    # No scheduler or kubelet runs here: admitted, and waiting for a node.
    assert created["status"].get("phase") == "Pending"
    assert created["spec"]["serviceAccountName"] == OPERATOR_SA


def allowed(cluster: Cluster, who: str, namespace: str) -> set[tuple[str, str]]:
    """(resource or URL, verb) pairs from `kubectl auth can-i --list` for `who`."""
    listed = cluster.kubectl("auth", "can-i", "--list", f"--as={who}", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:1] == ["Resources"], listed.stdout
    pairs = set()
    for row in rows:
        match = ROW.match(row)
        assert match is not None, f"unexpected row: {row!r}"
        assert not match["names"], f"a rule limited to names: {row!r}"
        targets = [match["resource"]] if match["resource"] else match["urls"].split()
        pairs |= {(target, verb) for target in targets for verb in match["verbs"].split()}
    return pairs


def test_the_service_account_may_do_what_the_rbac_promises_and_nothing_more(
    ns: Namespace,
) -> None:
    cluster = ns.cluster
    extra = allowed(cluster, SA, ns.name) - allowed(cluster, BASELINE_SA, ns.name)
    assert extra == PROMISED
    assert not any("*" in part for pair in extra for part in pair)


@pytest.mark.parametrize(
    ("verb", "expected"),
    [(verb, True) for verb in ("get", "list", "create", "update", "delete")]
    + [("watch", False), ("patch", False), ("deletecollection", False)],
)
def test_leases_only_in_the_operators_own_namespace(
    ns: Namespace, verb: str, expected: bool
) -> None:
    def can_i(*scope: str) -> str:
        answer = ns.cluster.kubectl(
            "auth", "can-i", verb, "leases.coordination.k8s.io", f"--as={SA}", *scope
        )
        return answer.stdout.strip()

    assert can_i("-n", OPERATOR_NAMESPACE) == ("yes" if expected else "no")
    assert can_i("-n", ns.name) == "no"
    assert can_i("--all-namespaces") == "no"


@pytest.mark.parametrize(
    ("verb", "resource", "expected"),
    [
        ("get", "secrets", True),
        *(
            (verb, "secrets", False)
            for verb in ("list", "watch", "create", "update", "patch", "delete")
        ),
        *((verb, "jobwatches.jobwatch.dev", True) for verb in ("get", "list", "watch", "delete")),
        *(
            (verb, "jobwatches.jobwatch.dev", False)
            for verb in ("create", "update", "patch", "deletecollection")
        ),
        ("patch", "jobwatches.jobwatch.dev/status", True),
        ("update", "jobwatches.jobwatch.dev/status", True),
        ("create", "events", True),
        ("create", "events.events.k8s.io", True),
        ("list", "events", False),
        ("delete", "events", False),
        ("get", "configmaps", False),
        ("create", "pods", False),
        ("impersonate", "serviceaccounts", False),
        ("*", "*", False),
    ],
)
def test_can_i(ns: Namespace, verb: str, resource: str, expected: bool) -> None:
    resource, _, subresource = resource.partition("/")
    extra = [f"--subresource={subresource}"] if subresource else []
    for scope in (["-n", ns.name], ["--all-namespaces"]):
        answer = ns.cluster.kubectl("auth", "can-i", verb, resource, *extra, f"--as={SA}", *scope)
        assert answer.stdout.strip() == ("yes" if expected else "no"), (
            verb,
            resource,
            scope,
            answer,
        )
