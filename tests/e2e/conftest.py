"""The e2e layer: a real API server, the operator's real RBAC, a fresh namespace per test.

By default the session starts a local control plane (etcd + kube-apiserver +
kube-controller-manager, see hack/cluster-up.sh) and stops it at the end. With
JOBWATCH_E2E_EXISTING_CLUSTER=1 the tests use the cluster that KUBECONFIG names
instead (for example a kind cluster) and leave it running.

Logs (control plane, and the operator of each test) are kept under
_out/test-logs/ when a run fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from gotools import pinned_kubectl
from harness import (
    REPO,
    Cluster,
    ControlPlane,
    JobServer,
    Namespace,
    Operator,
    iter_docs,
    wait_for,
)
from kubernetes import client as k8s
from kubernetes import config as k8s_config

LOGS = REPO / "_out" / "test-logs"
OPERATOR_NAMESPACE = "jobwatch-system"
OPERATOR_SA = "jobwatch-operator"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed:
        item.stash.setdefault(FAILED, True)
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    existing = os.environ.get("JOBWATCH_E2E_EXISTING_CLUSTER") == "1"
    if existing:
        kubeconfig = Path(os.environ["KUBECONFIG"])
        kubectl = shutil.which("kubectl") or str(pinned_kubectl())
        directory = None
    else:
        directory = Path(
            os.environ.get("JOBWATCH_TEST_CLUSTER_DIR", REPO / ".cache" / "test-cluster")
        )
        env = {**os.environ, "JOBWATCH_CLUSTER_DIR": str(directory)}
        up = subprocess.run(
            [str(REPO / "hack" / "cluster-up.sh")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if up.returncode != 0:
            pytest.fail(f"the local control plane did not start:\n{up.stdout}\n{up.stderr}")
        print(up.stdout.strip())
        kubeconfig = directory / "admin.kubeconfig"
        kubectl = str(pinned_kubectl())
    api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield Cluster(kubeconfig, kubectl, api, directory)
    finally:
        api.close()
        if directory is not None:
            failed = request.session.testsfailed > 0
            subprocess.run(
                [str(REPO / "hack" / "cluster-down.sh")],
                env={**os.environ, "JOBWATCH_CLUSTER_DIR": str(directory)},
                capture_output=True,
                check=False,
            )
            if failed:
                shutil.copytree(directory / "logs", LOGS / "control-plane", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def control_plane(cluster: Cluster) -> ControlPlane:
    """The local control plane's processes, to stop and start; skips on a cluster the
    tests do not own."""
    if cluster.directory is None:
        pytest.skip("JOBWATCH_E2E_EXISTING_CLUSTER=1: the tests do not own this control plane")
    return ControlPlane(cluster.directory)


@pytest.fixture(scope="session")
def installed(cluster: Cluster) -> Cluster:
    """The CRD and the operator's Namespace, ServiceAccount and RBAC from manifests/."""
    built = cluster.kubectl("kustomize", str(REPO / "manifests"))
    assert built.returncode == 0, built.stderr
    # All but the Deployment: the operator runs as a local process with its token.
    docs = [doc for doc in iter_docs(built.stdout) if doc["kind"] != "Deployment"]
    applied = cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(docs)
    )
    assert applied.returncode == 0, applied.stderr
    waited = cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/jobwatches.jobwatch.dev"
    )
    assert waited.returncode == 0, waited.stderr
    return cluster


@pytest.fixture(scope="session")
def operator_kubeconfig(installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig holding only a token of the operator's ServiceAccount."""
    out = tmp_path_factory.mktemp("operator") / "kubeconfig"
    return installed.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_SA, out)


@pytest.fixture
def ns(installed: Cluster) -> Iterator[Namespace]:
    name = f"jw-e2e-{uuid.uuid4().hex[:8]}"
    installed.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    try:
        yield Namespace(installed, name)
    finally:
        try:
            installed.core.delete_namespace(name, propagation_policy="Background")
        except k8s.ApiException as exc:
            if exc.status != 404:  # a test may have deleted it already
                raise


@pytest.fixture
def test_logs(request: pytest.FixtureRequest) -> Iterator[Path]:
    directory = LOGS / request.node.name.replace("/", "_")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    yield directory
    if not request.node.stash.get(FAILED, False):
        shutil.rmtree(directory, ignore_errors=True)


OperatorFactory = Callable[..., Operator]


@pytest.fixture
def start_operator(
    ns: Namespace, operator_kubeconfig: Path, test_logs: Path
) -> Iterator[OperatorFactory]:
    """Starts the operator (watching only this test's namespace); stops it after the test."""
    started: list[Operator] = []

    def start(**env: str) -> Operator:
        op = Operator(operator_kubeconfig, ns.name, test_logs / "operator.log", dict(env))
        started.append(op.start())
        return op

    yield start
    for op in started:
        if op.process is not None and op.process.poll() is None:
            op.stop()


@pytest.fixture
def operator(start_operator: OperatorFactory) -> Operator:
    return start_operator()


@pytest.fixture
def jobs() -> Iterator[JobServer]:
    server = JobServer()
    yield server
    server.close()


__all__ = ["wait_for"]
