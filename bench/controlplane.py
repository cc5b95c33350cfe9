"""The cluster a bench harness uses: a local control plane (or --kubeconfig's), the CRD
and RBAC installed, the operator's own kubeconfig, the bench namespace.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from benchenv import (
    EVENTS_PATH,
    GROUP,
    JW_PATH,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    OPERATOR_SA,
    PLURAL,
    REPO,
    BenchError,
    log,
)
from fleet import Options
from kubeclient import Kube, load_kubeconfig
from procs import run_command


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl: str
    pids: dict[str, int]  # apiserver, etcd, kcm: only when the harness runs the cluster


BENCH_CLUSTER = REPO / ".cache" / "bench-cluster"


async def control_plane(opts: Options) -> Cluster:
    """The cluster to use: --kubeconfig's, or a control plane started in .cache/bench-cluster.

    Stopping it is main()'s job, outside the event loop, so that it happens however
    the run ends.
    """
    if opts.kubeconfig is not None:
        async with asyncio.timeout(3600):  # builds the binaries if they are not cached
            bin_dir = (await run_command([str(REPO / "hack/build-controlplane.sh")])).strip()
        kubeconfig = opts.kubeconfig.resolve()
        return Cluster(kubeconfig, str(Path(bin_dir) / "kubectl"), local_control_plane(kubeconfig))
    log(f"starting the control plane in {BENCH_CLUSTER.relative_to(REPO)}")
    env = {**os.environ, "JOBWATCH_CLUSTER_DIR": str(BENCH_CLUSTER)}
    async with asyncio.timeout(3600):  # the first start on a machine builds the binaries
        out = await run_command([str(REPO / "hack/cluster-up.sh")], env=env)
    log(out.strip().splitlines()[0] if out.strip() else "control plane up")
    pids = {}
    for name in ("apiserver", "etcd", "kcm"):
        pid_file = BENCH_CLUSTER / f"{name}.pid"
        if pid_file.exists():
            pids[name] = int(pid_file.read_text().strip())
    kubectl = str(Path((BENCH_CLUSTER / "bin-dir").read_text().strip()) / "kubectl")
    return Cluster(BENCH_CLUSTER / "admin.kubeconfig", kubectl, pids)


def local_control_plane(kubeconfig: Path) -> dict[str, int]:
    """The pids of a control plane on loopback (the test cluster, say), for their CPU.

    Found by who listens on the API server's port, and on the etcd port its command
    line names. Empty for a remote cluster, or if anything is not as expected.
    """
    server = load_kubeconfig(kubeconfig).server
    host, _, port = server.removeprefix("https://").partition("/")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
        return {}

    def listener(port: int) -> int | None:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid is not None else None
        return None

    pids: dict[str, int] = {}
    try:
        apiserver = listener(int(port))
        if apiserver is None:
            return pids
        pids["apiserver"] = apiserver
        for arg in psutil.Process(apiserver).cmdline():
            if arg.startswith("http://127.0.0.1:"):  # --etcd-servers
                etcd = listener(int(arg.rsplit(":", 1)[1].split(",")[0]))
                if etcd is not None:
                    pids["etcd"] = etcd
                break
    except (psutil.Error, ValueError):
        pass
    return pids


def stop_control_plane() -> None:
    log("stopping the control plane")
    subprocess.run(
        [str(REPO / "hack/cluster-down.sh")],
        env={**os.environ, "JOBWATCH_CLUSTER_DIR": str(BENCH_CLUSTER)},
        capture_output=True,
        check=False,
        timeout=120,
    )


async def install(cluster: Cluster) -> None:
    """The CRD and the operator's Namespace, ServiceAccount and RBAC, as the e2e tests do."""
    kubectl = [cluster.kubectl, "--kubeconfig", str(cluster.kubeconfig)]
    async with asyncio.timeout(180):
        built = await run_command([*kubectl, "kustomize", str(REPO / "manifests")])
        # As tests/e2e/conftest.py: all but the Deployment, since the operator runs
        # here as a local process.
        docs = [d for d in yaml.safe_load_all(built) if d and d.get("kind") != "Deployment"]
        await run_command(
            [*kubectl, "apply", "--server-side", "--force-conflicts", "-f", "-"],
            stdin=yaml.safe_dump_all(docs),
        )
        await run_command(
            [
                *kubectl,
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                f"crd/{PLURAL}.{GROUP}",
            ]
        )


async def operator_kubeconfig(cluster: Cluster, out: Path) -> None:
    """A kubeconfig with a token of the operator's own ServiceAccount (its real RBAC)."""
    async with asyncio.timeout(60):
        await run_command(
            [
                str(REPO / "hack/sa-kubeconfig.sh"),
                OPERATOR_NAMESPACE,
                OPERATOR_SA,
                str(out),
                str(cluster.kubeconfig),
            ],
            env={**os.environ, "KUBECTL": cluster.kubectl},
        )


async def ensure_namespace(kube: Kube) -> None:
    await kube.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        ok=(201, 409),
    )


async def empty_namespace(kube: Kube) -> None:
    """Deletes every JobWatch and Event in the namespace and waits until none is left."""
    async with asyncio.timeout(300):
        await kube.request("DELETE", JW_PATH, ok=(200, 404))
        await kube.request("DELETE", EVENTS_PATH, ok=(200, 404))
        for _ in range(300):
            listed = await kube.request("GET", JW_PATH, params={"limit": "1"})
            if not listed.get("items"):
                return
            await asyncio.sleep(1)
    raise BenchError(f"JobWatches in {NAMESPACE} were not all deleted within 300s")
