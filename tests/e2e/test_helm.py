"""charts/jobwatch on a real API server, with the pinned helm.

`helm install` into a namespace under Pod Security `restricted` (the ReplicaSet's pods
admitted), `helm upgrade`, the chart's RBAC equal to manifests/' (`kubectl auth can-i`),
the namespaced layout of both (rights in the listed namespaces only, proved with can-i
and with the operator polling on those rights alone), and `helm uninstall` leaving the
CRD and the JobWatches and nothing else.

The session has installed manifests/' CRD and RBAC (the `installed` fixture). Each test
uses a release and namespaces of its own, never `jobwatch`, so that no name collides
with that install: Helm skips the CRD that exists, and the chart's ClusterRole is
`<release>-jobwatch-operator`.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import OPERATOR_NAMESPACE, OPERATOR_SA
from gotools import CHART, Helm
from harness import REPO, Cluster, JobServer, Namespace, Operator, Reply, iter_docs, wait_for
from kubernetes import client as k8s
from test_deployment import BASELINE_SA, PROMISED, allowed, kubectl_json

KUSTOMIZE_SA = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
LEASES = {
    ("leases.coordination.k8s.io", verb) for verb in ("get", "list", "create", "update", "delete")
}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
INSTANCE = "app.kubernetes.io/instance"
DONE = Reply(200, {"status": "COMPLETED"})


@dataclass(frozen=True)
class Release:
    helm: Helm
    name: str
    namespace: str

    @property
    def operator(self) -> str:
        """The Deployment and ServiceAccount (<release>-jobwatch-operator)."""
        return f"{self.name}-jobwatch-operator"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.operator}"

    def upgrade(self, *args: str) -> str:
        upgraded = self.helm.run(
            "upgrade", self.name, str(CHART), "--namespace", self.namespace, *args
        )
        assert upgraded.returncode == 0, upgraded.stderr
        return upgraded.stdout


NamespaceFactory = Callable[..., str]
ReleaseFactory = Callable[..., Release]


@pytest.fixture
def own_cluster(installed: Cluster) -> bool:
    """False on a cluster the tests do not own (JOBWATCH_E2E_EXISTING_CLUSTER=1): there a
    Deployment's pods would really run, and poll every namespace."""
    return installed.directory is not None


@pytest.fixture
def new_namespace(installed: Cluster) -> Iterator[NamespaceFactory]:
    """Makes fresh namespaces (labels as keywords); deletes them after the test."""
    made: list[str] = []

    def make(labels: dict[str, str] | None = None) -> str:
        name = f"jw-e2e-{uuid.uuid4().hex[:8]}"
        body = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name, labels=labels or {}))
        installed.core.create_namespace(body)
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            installed.core.delete_namespace(name, propagation_policy="Background")
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def release_helm(helm: Helm, installed: Cluster) -> Helm:
    return dataclasses.replace(helm, kubeconfig=installed.kubeconfig)


@pytest.fixture
def install(release_helm: Helm, own_cluster: bool) -> Iterator[ReleaseFactory]:
    """`helm install` of charts/jobwatch (its output printed: the test log shows it);
    every release made is uninstalled after the test, its cluster-wide RBAC with it."""
    made: list[Release] = []

    def install_release(namespace: str, *args: str) -> Release:
        release = Release(release_helm, f"jw-{uuid.uuid4().hex[:6]}", namespace)
        if not own_cluster:
            args = ("--set", "replicaCount=0", *args)
        command = ("install", release.name, str(CHART), "--namespace", namespace, *args)
        installed = release_helm.run(*command)
        assert installed.returncode == 0, installed.stderr
        print(f"$ helm {' '.join(command)}\n{installed.stdout}{installed.stderr}")
        made.append(release)
        return release

    yield install_release
    for release in made:
        gone = release.helm.run(
            "uninstall", release.name, "--namespace", release.namespace, "--ignore-not-found"
        )
        assert gone.returncode == 0, gone.stderr


def pods(cluster: Cluster, release: Release) -> list[dict[str, Any]]:
    got = kubectl_json(
        cluster, "get", "pods", "-n", release.namespace, "-l", f"{INSTANCE}=" + release.name
    )
    return list(got["items"])


def wait_for_admitted_pods(
    cluster: Cluster, release: Release, count: int, check: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Pods of the release's Deployment that kube-controller-manager's ReplicaSet created,
    i.e. that Pod Security admission let in (a refused one is an event on the ReplicaSet)."""

    def found() -> list[dict[str, Any]] | None:
        matching = [pod for pod in pods(cluster, release) if check(pod)]
        return matching if len(matching) >= count else None

    try:
        return wait_for(found, 60, f"{count} admitted pods of {release.operator}")
    except AssertionError as exc:
        events = kubectl_json(cluster, "get", "events", "-n", release.namespace)
        refused = [e["message"] for e in events["items"] if e["reason"] == "FailedCreate"]
        raise AssertionError(f"{exc}\nrefused: {refused}") from None


def env_of(pod_spec: dict[str, Any]) -> dict[str, str]:
    (container,) = pod_spec["containers"]
    return {var["name"]: var.get("value", "") for var in container["env"]}


def test_install_under_pod_security_restricted(
    installed: Cluster, own_cluster: bool, new_namespace: NamespaceFactory, install: ReleaseFactory
) -> None:
    if not own_cluster:
        pytest.skip("JOBWATCH_E2E_EXISTING_CLUSTER=1: the operator pods would run there")
    namespace = new_namespace(RESTRICTED)
    # Pod Security admission enforces there: a Pod without the restricted settings is refused.
    probe = installed.kubectl(
        "run", "psa-probe", "-n", namespace, "--image=busybox", "--dry-run=server"
    )
    assert probe.returncode != 0 and "violates PodSecurity" in probe.stderr, probe
    release = install(namespace)
    created = wait_for_admitted_pods(installed, release, 2, lambda pod: True)
    for pod in created:
        [owner] = pod["metadata"]["ownerReferences"]
        replica_set = kubectl_json(installed, "get", "replicaset", owner["name"], "-n", namespace)
        assert replica_set["metadata"]["ownerReferences"][0]["name"] == release.operator
        assert pod["spec"]["serviceAccountName"] == release.operator
        # No scheduler or kubelet runs here: admitted, and waiting for a node.
        assert pod["status"].get("phase") == "Pending"
    listed = release.helm.run("list", "--namespace", namespace, "--output", "json")
    assert [(r["name"], r["status"]) for r in json.loads(listed.stdout)] == [
        (release.name, "deployed")
    ]


def test_upgrade_changes_the_deployment(
    installed: Cluster, own_cluster: bool, new_namespace: NamespaceFactory, install: ReleaseFactory
) -> None:
    if not own_cluster:
        pytest.skip("JOBWATCH_E2E_EXISTING_CLUSTER=1: the operator pods would run there")
    release = install(new_namespace(RESTRICTED))
    wait_for_admitted_pods(installed, release, 2, lambda pod: True)
    print(release.upgrade("--reuse-values", "--set", "replicaCount=3", "--set", "logFormat=json"))
    deployment = kubectl_json(
        installed, "get", "deployment", release.operator, "-n", release.namespace
    )
    assert deployment["spec"]["replicas"] == 3
    assert env_of(deployment["spec"]["template"]["spec"])["JOBWATCH_LOG_FORMAT"] == "json"
    # The rollout's first new pod (maxSurge 1; none become ready without a kubelet).
    wait_for_admitted_pods(
        installed, release, 1, lambda pod: env_of(pod["spec"]).get("JOBWATCH_LOG_FORMAT") == "json"
    )
    history = release.helm.run("history", release.name, "-n", release.namespace, "-o", "json")
    assert [(r["revision"], r["status"]) for r in json.loads(history.stdout)] == [
        (1, "superseded"),
        (2, "deployed"),
    ]


def test_a_bad_value_fails_the_install_and_leaves_nothing(
    installed: Cluster, release_helm: Helm, new_namespace: NamespaceFactory
) -> None:
    namespace = new_namespace()
    name = f"jw-{uuid.uuid4().hex[:6]}"
    refused = release_helm.run(
        "install", name, str(CHART), "--namespace", namespace, "--set", "logFormat=xml"
    )
    assert refused.returncode != 0
    assert "/logFormat" in refused.stderr, refused.stderr
    assert release_helm.run("list", "-a", "-n", namespace, "-q").stdout.strip() == ""
    assert leftovers(installed, name) == []


def test_the_charts_rbac_is_manifests_rbac(
    installed: Cluster, ns: Namespace, new_namespace: NamespaceFactory, install: ReleaseFactory
) -> None:
    release = install(new_namespace())

    def extra(who: str, namespace: str) -> set[tuple[str, str]]:
        return allowed(installed, who, namespace) - allowed(installed, BASELINE_SA, namespace)

    assert extra(release.service_account, ns.name) == extra(KUSTOMIZE_SA, ns.name) == PROMISED
    # The Leases, in the operator's own namespace only.
    in_own = extra(release.service_account, release.namespace)
    assert in_own - PROMISED == extra(KUSTOMIZE_SA, OPERATOR_NAMESPACE) - PROMISED == LEASES


def kustomized_namespaced(installed: Cluster, moves: dict[str, str]) -> None:
    """manifests/overlays/namespaced applied with its namespaces moved to this test's
    (jobwatch-system, team-a, team-b): the same names, in namespaces of their own, so
    nothing touches the session's install. The CRD exists and the Deployment is not
    needed for RBAC: both are left out."""
    built = installed.kubectl("kustomize", str(REPO / "manifests" / "overlays" / "namespaced"))
    assert built.returncode == 0, built.stderr
    docs = []
    for doc in iter_docs(built.stdout):
        if doc["kind"] in {"Namespace", "CustomResourceDefinition", "Deployment"}:
            continue
        # Nothing cluster-wide in this layout: every object left has a namespace.
        doc["metadata"]["namespace"] = moves[doc["metadata"]["namespace"]]
        for subject in doc.get("subjects", []):
            subject["namespace"] = moves[subject["namespace"]]
        docs.append(doc)
    applied = installed.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert applied.returncode == 0, applied.stderr


@pytest.mark.parametrize("layout", ["helm", "kustomize"])
def test_namespaced_rights_only_where_watched(
    installed: Cluster, new_namespace: NamespaceFactory, install: ReleaseFactory, layout: str
) -> None:
    own, watched_a, watched_b, other = (new_namespace() for _ in range(4))
    if layout == "helm":
        release = install(
            own, "--set-json", f"watchNamespaces={json.dumps([watched_a, watched_b])}"
        )
        who = release.service_account
    else:
        kustomized_namespaced(
            installed, {OPERATOR_NAMESPACE: own, "team-a": watched_a, "team-b": watched_b}
        )
        who = f"system:serviceaccount:{own}:{OPERATOR_SA}"

    def extra(namespace: str) -> set[tuple[str, str]]:
        return allowed(installed, who, namespace) - allowed(installed, BASELINE_SA, namespace)

    assert extra(watched_a) == extra(watched_b) == PROMISED
    assert extra(other) == set()
    assert extra(own) == LEASES

    def can_i(*args: str) -> str:
        return installed.kubectl("auth", "can-i", *args, f"--as={who}").stdout.strip()

    assert can_i("get", "secrets", "-n", watched_a) == "yes"
    assert can_i("get", "secrets", "-n", other) == "no"
    assert can_i("get", "secrets", "--all-namespaces") == "no"
    assert can_i("list", "jobwatches.jobwatch.dev", "--all-namespaces") == "no"
    bindings = kubectl_json(installed, "get", "clusterrolebindings")["items"]
    bound = [
        b["metadata"]["name"]
        for b in bindings
        for s in b.get("subjects") or []
        if s.get("kind") == "ServiceAccount" and s.get("namespace") == own
    ]
    assert bound == []


@dataclass(frozen=True)
class Watching:
    """A release of the chart that watches two namespaces of its own."""

    release: Release
    namespaces: tuple[str, str]


@pytest.fixture
def watching(new_namespace: NamespaceFactory, install: ReleaseFactory) -> Watching:
    own, watched_a, watched_b = (new_namespace() for _ in range(3))
    # No pods: the operator runs here as a local process, with the release's token.
    release = install(
        own,
        "--set-json",
        f"watchNamespaces={json.dumps([watched_a, watched_b])}",
        "--set",
        "replicaCount=0",
    )
    return Watching(release, (watched_a, watched_b))


def test_the_operator_polls_with_the_namespaced_rights_alone(
    installed: Cluster, watching: Watching, jobs: JobServer, test_logs: Path, tmp_path: Path
) -> None:
    """The operator, run with a token of the chart's ServiceAccount and watching the
    listed namespaces, lists and watches them, reads an opted-in Secret, writes status
    and Events, and shares its buckets through the Leases of its own namespace: nothing
    at start-up or while polling needs a cluster-wide right."""
    release, (watched_a, watched_b) = watching.release, watching.namespaces
    own = release.namespace
    kubeconfig = installed.service_account_kubeconfig(
        own, release.operator, tmp_path / "kubeconfig"
    )
    operator = Operator(
        kubeconfig,
        f"{watched_a},{watched_b}",
        test_logs / "operator.log",
        {"JOBWATCH_LEASE_NAMESPACE": own},
    ).start()
    try:
        a, b = Namespace(installed, watched_a), Namespace(installed, watched_b)
        a.secret("api-token", {"token": "Bearer t0k3n"}, labels={"jobwatch.dev/allow-use": "true"})
        a.create(
            "with-secret",
            {
                "url": jobs.script("/a", [DONE]),
                "successWhen": 'response.body.status == "COMPLETED"',
                "headers": [
                    {
                        "name": "Authorization",
                        "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}},
                    }
                ],
            },
        )
        b.create(
            "plain",
            {
                "url": jobs.script("/b", [DONE]),
                "successWhen": 'response.body.status == "COMPLETED"',
            },
        )
        a.wait_phase("with-secret", "Succeeded", 30)
        b.wait_phase("plain", "Succeeded", 30)
        assert jobs.seen("/a")[0].headers["authorization"] == "Bearer t0k3n"
        wait_for(lambda: a.events("with-secret"), 20, "an Event for the phase change")
        leases = kubectl_json(installed, "get", "leases", "-n", own)["items"]
        assert leases, "the replica's Leases in its own namespace"
    finally:
        operator.stop()
    log = operator.logs()
    assert "forbidden" not in log.lower(), log


def leftovers(cluster: Cluster, release: str) -> list[str]:
    """Every object of any listable kind that carries the release's instance label or is
    Helm's record of it (a Secret labelled owner=helm, name=<release>)."""
    kinds = cluster.kubectl("api-resources", "--verbs=list", "-o", "name")
    assert kinds.returncode == 0, kinds.stderr
    every = ",".join(kinds.stdout.split())
    found = []
    for selector in (f"{INSTANCE}={release}", f"owner=helm,name={release}"):
        got = cluster.kubectl("get", every, "-A", "-l", selector, "-o", "name")
        assert got.returncode == 0, got.stderr
        found += got.stdout.split()
    return found


def test_uninstall_leaves_the_crd_and_the_jobwatches_and_nothing_else(
    installed: Cluster, ns: Namespace, new_namespace: NamespaceFactory, install: ReleaseFactory
) -> None:
    release = install(new_namespace(RESTRICTED))
    assert leftovers(installed, release.name)  # the check sees the release's objects
    ns.create("kept", {"url": "http://jobs.example/1", "successWhen": "true"})
    gone = release.helm.run("uninstall", release.name, "--namespace", release.namespace)
    assert gone.returncode == 0, gone.stderr
    print(gone.stdout)
    # The garbage collector removes the ReplicaSets and Pods after the Deployment.
    wait_for(lambda: not leftovers(installed, release.name), 60, "no object of the release")
    crd = installed.kubectl("get", "crd", "jobwatches.jobwatch.dev", "-o", "name")
    assert (
        crd.stdout.strip()
        == "customresourcedefinition.apiextensions.k8s.io/jobwatches.jobwatch.dev"
    )
    assert ns.get("kept") is not None
