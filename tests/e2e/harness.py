"""What e2e tests drive: the cluster, the operator process and a job API to poll.

Tests wait on observable state (`wait_for`), never on fixed sleeps.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client as k8s

from jobscript import JobServer, Reply, Seen
from loopback import free_port

# What the tests import from here; the job API they script (JobServer, Reply, Seen) and
# free_port are the ones the benchmarks use too (bench/jobscript.py, bench/loopback.py).
__all__ = [
    "GROUP",
    "PLURAL",
    "REPO",
    "VERSION",
    "Cluster",
    "ControlPlane",
    "JobServer",
    "Namespace",
    "Operator",
    "Reply",
    "Seen",
    "condition",
    "free_port",
    "gaps",
    "iter_docs",
    "overlaps",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Polls `probe` until it returns something truthy; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_bin: str
    api: k8s.ApiClient
    # The local control plane's folder (hack/cluster-up.sh); None for a cluster that
    # the tests do not own (JOBWATCH_E2E_EXISTING_CLUSTER=1).
    directory: Path | None = None

    def kubectl(
        self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def service_account_kubeconfig(self, namespace: str, name: str, out: Path) -> Path:
        """A kubeconfig holding only a token of that ServiceAccount (hack/sa-kubeconfig.sh)."""
        made = subprocess.run(
            [
                str(REPO / "hack" / "sa-kubeconfig.sh"),
                namespace,
                name,
                str(out),
                str(self.kubeconfig),
            ],
            env={**os.environ, "KUBECTL": self.kubectl_bin},
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        return out

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api)

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)


# component -> its pid file in the control plane's folder (hack/cluster-up.sh)
PID_FILES = {
    "etcd": "etcd.pid",
    "kube-apiserver": "apiserver.pid",
    "kube-controller-manager": "kcm.pid",
}


class ControlPlane:
    """Stops and starts the processes of the local control plane one at a time.

    A component starts again with the very command line it ran with, read from
    /proc: the same ports, serving certificate, ServiceAccount keys, token file and
    etcd data, so every kubeconfig and token made before stays valid. The pid files
    are kept up to date, so hack/cluster-down.sh still stops everything.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._argv: dict[str, list[str]] = {}  # the command line of each stopped component

    def _pid(self, component: str) -> int:
        return int((self.directory / PID_FILES[component]).read_text().strip())

    def running(self, component: str) -> bool:
        try:
            state = Path(f"/proc/{self._pid(component)}/stat").read_text().rsplit(")", 1)[1]
        except (OSError, ValueError):
            return False
        return state.split()[0] != "Z"

    def stop(self, component: str, grace: float = 5) -> None:
        """SIGTERM, SIGKILL after `grace` seconds, and wait until the process is gone.

        kube-apiserver serves the watches open at SIGTERM for a long while (20 s and
        more) but refuses new connections at once: the grace keeps tests short."""
        pid = self._pid(component)
        self._argv[component] = _cmdline(pid)
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not self.running(component), grace, f"{component} to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not self.running(component), 10, f"{component} to die")

    def start(self, component: str, timeout: float = 90) -> None:
        """Starts a stopped component as it ran before; returns once it is ready."""
        assert not self.running(component), f"{component} is running"
        log = (self.directory / "logs" / f"{component}.log").open("ab")
        log.write(f"\n===== {component} start (e2e) {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        proc = subprocess.Popen(
            self._argv[component],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        # Reaped as soon as it exits: a zombie would look alive to cluster-down.sh.
        threading.Thread(target=proc.wait, daemon=True).start()
        (self.directory / PID_FILES[component]).write_text(f"{proc.pid}\n")
        wait_for(lambda: self.ready(component), timeout, f"{component} to be ready", 0.1)

    def heal(self) -> None:
        """Starts again, in order, whatever was stopped here and is still stopped."""
        for component in PID_FILES:
            if component in self._argv and not self.running(component):
                self.start(component)

    def _flag(self, component: str, name: str) -> str:
        argv = self._argv.get(component) or _cmdline(self._pid(component))
        return argv[argv.index(name) + 1]

    def etcd_url(self) -> str:
        return self._flag("etcd", "--listen-client-urls").split(",")[0]

    def ready(self, component: str) -> bool:
        if not self.running(component):
            return False
        if component == "etcd":
            url, context = f"{self.etcd_url()}/health", None
        elif component == "kube-apiserver":
            port = self._flag(component, "--secure-port")
            url = f"https://127.0.0.1:{port}/readyz"
            context = ssl.create_default_context(cafile=self.directory / "pki" / "ca.crt")
        else:
            return True  # no probe needed: it retries the API server on its own
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def etcd(self, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A call of etcd's v3 JSON gateway (`kv/put`, `kv/compaction`, ...)."""
        request = urllib.request.Request(
            f"{self.etcd_url()}/v3/{method}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))


def _cmdline(pid: int) -> list[str]:
    return [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]


@dataclass
class Namespace:
    """A fresh namespace for one test, with shortcuts for JobWatches in it."""

    cluster: Cluster
    name: str

    def create(
        self, name: str, spec: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "JobWatch",
            "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": dict(spec),
        }
        return dict(
            self.cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.name, PLURAL, body
            )
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.cluster.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.name, PLURAL, name
                )
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get(name) or {}
        return dict(obj.get("status") or {})

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.name, PLURAL, name, {"spec": dict(spec)}
        )

    def delete(self, name: str) -> None:
        self.cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, self.name, PLURAL, name)

    def wait_status(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status and check(status) else None

        try:
            return wait_for(probe, timeout, f"{name}: {what}", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nfinal status: {json.dumps(self.status(name))}") from None

    def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
        return self.wait_status(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    def events(self, name: str) -> list[k8s.CoreV1Event]:
        found = self.cluster.core.list_namespaced_event(
            self.name, field_selector=f"involvedObject.name={name}"
        )
        return list(found.items)

    def secret(
        self, name: str, data: Mapping[str, str], labels: Mapping[str, str] | None = None
    ) -> None:
        body = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, labels=dict(labels or {})),
            string_data=dict(data),
        )
        try:
            self.cluster.core.create_namespaced_secret(self.name, body)
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise
            self.cluster.core.replace_namespaced_secret(name, self.name, body)


def condition(status: Mapping[str, Any], kind: str) -> dict[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


@dataclass
class Operator:
    """The operator as a separate process, run with the operator's ServiceAccount token."""

    kubeconfig: Path
    namespace: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    health_port: int = 0

    def start(self) -> Operator:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.health_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "JOBWATCH_NAMESPACES": self.namespace,
            "JOBWATCH_HEALTH_PORT": str(self.health_port),
            "JOBWATCH_METRICS_PORT": str(free_port()),
            "JOBWATCH_STATUS_PROGRESS_INTERVAL": "500ms",
            **self.env,
        }
        log = self.log_path.open("ab")
        log.write(f"\n===== operator start {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobwatch"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()
        return self

    def stop(self, timeout: float = 15) -> float:
        """SIGTERM, then wait; returns how long the process took to exit."""
        assert self.process is not None
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"operator did not exit within {timeout}s of SIGTERM"
                ) from None
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def gaps(seen: Sequence[Seen]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(seen)]


def overlaps(seen: Sequence[Seen], since: float = 0.0) -> list[float]:
    """Two requests of one path in flight at once: for each request arriving at `since`
    or later while an earlier one was still in flight, how long the two were in flight
    together (seconds; one still in flight counts until now)."""
    now = time.monotonic()
    found: list[float] = []
    ordered = sorted(seen, key=lambda s: s.at)
    for i, later in enumerate(ordered):
        if later.at < since:
            continue
        later_end = now if later.end is None else later.end
        together = max(
            (min(now if s.end is None else s.end, later_end) - later.at for s in ordered[:i]),
            default=0.0,
        )
        if together > 0:
            found.append(together)
    return found


def iter_docs(text: str) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(text):
        if doc:
            yield doc
