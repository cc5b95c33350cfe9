"""Scale benchmark: N JobWatches in one operator process, against the real local control plane.

    .venv/bin/python bench/scale.py                      # N = 100 … 10000; 120 s each
    .venv/bin/python bench/scale.py --sizes 10000 --duration 120
    .venv/bin/python bench/scale.py --overload           # largest N at half the interval
    .venv/bin/python bench/scale.py --smoke              # 200 watches, 30 s: does the harness work
    .venv/bin/python bench/scale.py --kubeconfig .cache/test-cluster/admin.kubeconfig ...
    .venv/bin/python bench/scale.py --sizes 5000 --duration 60 --profile  # + CPU profile
    .venv/bin/python bench/scale.py --sizes 10000 \
        --latency lognormal:median=50ms,p99=1s,hang=0.5%      # endpoints that take time

docs/benchmarks.md has the figures, and what each one measures exactly.

One run per size, each with a fresh operator and a fresh job API:

1. the namespace jobwatch-bench is emptied, the job API (bench/jobapi.py) starts on one
   loopback port (one job service host, the common case; --hosts N spreads the watches
   evenly over N ports, each a host of its own to the operator's per-host limits), and N
   JobWatches are created through the API (admin token, bounded concurrency), all
   before the operator starts;
2. the operator starts (`python -m jobwatch`, its own ServiceAccount's token, watching
   only jobwatch-bench, every other setting at the default a user gets unless
   --operator-env says otherwise) and the time until every job id has been polled once
   is taken from the job API's own records;
3. after one more interval (the first-poll burst is over) a steady window of --duration
   seconds is measured.

Every figure is given for three spans, each labelled: start-up (operator start to the
window's start), the steady window, and the whole run (operator start to the window's
end); the targets are judged for the window and for the whole run. Measured from the
user's side wherever possible:
- detection latency: from the job's real end (a wall-clock time the job API draws
  independently of the polls) to the harness's own watch seeing phase Succeeded;
- gaps: the time between successive requests for a job, as the job API recorded them;
- writes: the API server's own apiserver_request_total (status PATCHes, Event POSTs,
  failures), plus the operator's count of Events it dropped;
- operator CPU per poll and RSS (psutil), poll lag (the operator's own histogram, beside
  the gaps), API server 429s, HTTP errors.

4. the operator stops; raw aiohttp and jobwatch's HttpClient then each send the same
   polls/s to the same job API from a process of their own (bench/http_client_cpu.py
   paced), for their CPU per request.

Results: bench/results/scale-<timestamp>.json and latest.json, the plot
bench/results/scale.png, and a table on stdout. Logs: _out/bench/. Everything the
harness starts (control plane included, unless --kubeconfig names one) is stopped at
the end, also on Ctrl-C, SIGTERM or an error. Only loopback is used.

Exit status: 0 when the harness did its job, whatever the figures; 1 when it broke
(the operator died, no poll happened, no results were written...).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

import benchstats as st
import jobapi
from kubeclient import Kube, KubeError, load_kubeconfig

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
LOGS = REPO / "_out" / "bench"
PYTHON = sys.executable

NAMESPACE = "jobwatch-bench"
GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
JW_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
EVENTS_PATH = f"/api/v1/namespaces/{NAMESPACE}/events"
OPERATOR_NAMESPACE, OPERATOR_SA = "jobwatch-system", "jobwatch-operator"
LAG = "jobwatch_poll_lag_seconds"
HTTP_ERROR_REASONS = ("TransientError", "HTTPError", "InvalidResponse")
MiB = 1024 * 1024

# The targets, for 10,000 watches at 2,000 polls/s.
TARGET_RSS_MIB = 300.0
TARGET_CPU_MS_PER_POLL = 0.4
TARGET_LAG_P99 = 0.050
TARGET_LAG_MAX = 0.250
TARGET_DETECTION_SLACK = 1.0  # detection p99 <= interval + this
TARGET_WRITES_PER_POLL = 0.2
TARGET_WRITES_PER_S = 20.0
TARGET_ALL_POLLING_S = 15.0
TARGET_HTTP_RATIO = 3.0
# The pending interval's spread (API.md: +-10 %) plus the lag targets, as the job service
# sees them: no gap longer than interval x 1.1 + 250 ms, 99 % within interval x 1.1 + 50 ms.
GAP_SPREAD = 0.1
# The operator's defaults, for the figures that depend on them (config.py).
DEFAULT_MAX_IN_FLIGHT = 200
DEFAULT_STATUS_QPS, DEFAULT_STATUS_BURST = 18.0, 50
DEFAULT_REQUEST_TIMEOUT = 30.0  # spec.requestTimeout
# The operator spreads the first round of polls at up to this rate, or over one interval
# when that is faster (runtime.START_UP_POLLS_PER_SECOND).
START_UP_POLLS_PER_S = 1000.0


class BenchError(Exception):
    """The harness could not do its job (as opposed to: the figures are bad)."""


@dataclass(frozen=True)
class Options:
    mode: str  # "scale", "overload" or "smoke"
    sizes: tuple[int, ...]
    interval: float  # seconds, spec.interval of every JobWatch (halved by --overload)
    duration: float  # the steady window, seconds
    kubeconfig: Path | None
    results_dir: Path
    seed: int
    mean_polls: float
    pending_fraction: float
    create_concurrency: int
    http_seconds: float
    sample_every: float  # seconds between series points
    profile: bool  # run the operator under bench/sampling_profiler.py
    operator_env: dict[str, str] = field(default_factory=dict)
    hosts: int = 1  # job API ports, each a host of its own to the operator
    latency: str = "none"  # the job API's answer delays (bench/jobapi.py --latency)
    request_timeout: float | None = None  # spec.requestTimeout; None: the default


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def go_duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# --- processes ----------------------------------------------------------------


class Children:
    """Every long-running process the harness starts; all are stopped, whatever happens.

    Each gets a session of its own, so that Ctrl-C reaches only the harness, which
    then stops them in order (the operator first, with SIGTERM, so it can flush).
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    async def stop(self, proc: subprocess.Popen[bytes], grace: float) -> tuple[float, bool]:
        """SIGTERM, then SIGKILL after `grace` seconds; (seconds it took, whether killed)."""
        started = time.monotonic()
        killed = False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await asyncio.to_thread(proc.wait)
            except TimeoutError:
                proc.kill()
                killed = True
                await asyncio.to_thread(proc.wait)
        if proc in self._procs:
            self._procs.remove(proc)
        return time.monotonic() - started, killed

    def stop_all(self) -> None:
        """The safety net (synchronous: it also runs after the event loop is gone)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


async def run_command(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> str:
    """Runs a command to its end (callers bound it with asyncio.timeout); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except BaseException:  # cancelled or timed out: leave no process behind
        if proc.returncode is None:
            proc.kill()
        raise
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{out.decode()}\n{err.decode()}"
        )
    return out.decode()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the cluster ----------------------------------------------------------------


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


def jobwatch(
    i: int, ports: Sequence[int], interval: float, request_timeout: float | None
) -> dict[str, Any]:
    """Watch i polls job j<i> on port i mod K. Only interval and timeout (and
    requestTimeout when given) differ from the defaults."""
    spec: dict[str, Any] = {
        "url": f"http://127.0.0.1:{ports[i % len(ports)]}/api/jobs/j{i}/status",
        "interval": go_duration(interval),
        "timeout": "1h",
        "successWhen": 'response.body.status == "COMPLETED"',
        "failureWhen": 'response.body.status == "FAILED"',
        "result": {"link": "response.body.resultLink"},
    }
    if request_timeout is not None:
        spec["requestTimeout"] = go_duration(request_timeout)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "JobWatch",
        "metadata": {"name": f"w{i:05d}"},
        "spec": spec,
    }


async def create_watches(
    kube: Kube, n: int, ports: Sequence[int], interval: float, opts: Options
) -> float:
    """Creates w00000 … with --create-concurrency requests in flight; the seconds it took."""
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:  # one iterator shared by all workers
            body = jobwatch(i, ports, interval, opts.request_timeout)
            for attempt in range(6):
                try:
                    await kube.request("POST", JW_PATH, body=body, ok=(201,))
                    break
                except KubeError as exc:
                    if exc.status not in (429, 500, 503, 504) or attempt == 5:
                        raise BenchError(f"creating {body['metadata']['name']}: {exc}") from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if attempt == 5:
                        raise BenchError(f"creating {body['metadata']['name']}: {exc!r}") from None
                await asyncio.sleep(0.2 * 2**attempt)

    started = time.monotonic()
    async with asyncio.timeout(max(120.0, n / 10)):
        await asyncio.gather(*(worker() for _ in range(opts.create_concurrency)))
    return time.monotonic() - started


class FleetWatch:
    """The harness's own watch on every JobWatch (admin token): when each was first seen
    with a status and Succeeded, and how many status writes (MODIFIED events) each
    received."""

    def __init__(self, kube: Kube, n: int) -> None:
        self._kube, self.n = kube, n
        self.modified = [0] * n
        self.phase: list[str | None] = [None] * n
        self.succeeded_at: list[float | None] = [None] * n
        self.status_at: list[float | None] = [None] * n  # first seen with a status.phase
        self.relists = 0  # a relist after a broken watch may have missed events
        self.ready = asyncio.Event()

    def _index(self, obj: dict[str, Any]) -> int | None:
        name = str(obj.get("metadata", {}).get("name", ""))
        if name[:1] == "w" and name[1:].isdigit() and int(name[1:]) < self.n:
            return int(name[1:])
        return None

    def _apply(self, kind: str, obj: dict[str, Any], now: float) -> None:
        i = self._index(obj)
        if i is None:
            return
        if kind == "MODIFIED":
            self.modified[i] += 1
        phase = (obj.get("status") or {}).get("phase")
        self.phase[i] = phase
        if phase is not None and self.status_at[i] is None:
            self.status_at[i] = now
        if phase == "Succeeded" and self.succeeded_at[i] is None:
            self.succeeded_at[i] = now

    async def _relist(self) -> str:
        items, version = await self._kube.list_all(JW_PATH)
        now = time.time()
        for obj in items:
            self._apply("LISTED", obj, now)
        return version

    async def run(self) -> None:
        version = await self._relist()
        self.ready.set()
        for _ in range(1000):  # reconnects, bounded
            try:
                async for event in self._kube.watch(JW_PATH, version):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                    version = str(obj.get("metadata", {}).get("resourceVersion", version))
                    if event.get("type") != "BOOKMARK":
                        self._apply(str(event.get("type")), obj, time.time())
            except (KubeError, aiohttp.ClientError) as exc:
                if isinstance(exc, KubeError) and exc.status == 410:
                    self.relists += 1
                    version = await self._relist()
                else:
                    await asyncio.sleep(1)

    def phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for phase in self.phase:
            key = phase or "(no status)"
            counts[key] = counts.get(key, 0) + 1
        return counts


# --- the job API and the operator ---------------------------------------------------


class JobApi:
    def __init__(self, session: aiohttp.ClientSession, ports: Sequence[int]) -> None:
        self._session, self.ports = session, list(ports)
        self.base = f"http://127.0.0.1:{ports[0]}"

    async def _get(self, path: str) -> Any:
        async with self._session.get(
            self.base + path, timeout=aiohttp.ClientTimeout(total=30)
        ) as response:
            response.raise_for_status()
            return await response.json()

    async def stats(self) -> dict[str, float]:
        return dict(await self._get("/stats"))

    async def per_job(self) -> dict[str, list[Any]]:
        return dict(await self._get("/stats/jobs"))

    async def request_times(self, since: float | None = None) -> dict[str, list[float]]:
        """Every request per job; with `since`, those from then on and the last before."""
        query = "" if since is None else f"?since={since:.6f}"
        return dict(await self._get("/stats/requests" + query))

    async def request_delays(self) -> dict[str, list[float]]:
        return dict(await self._get("/stats/delays"))

    async def request_spans(
        self, since: float | None = None
    ) -> dict[str, list[tuple[float, float | None]]]:
        """Every request's [arrival, end]; with `since`, those in flight from then on."""
        query = "" if since is None else f"?since={since:.6f}"
        return dict(await self._get("/stats/spans" + query))

    async def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        for _ in range(200):  # 20 s
            if proc.poll() is not None:
                raise BenchError(f"the job API exited with {proc.returncode}")
            try:
                await self.stats()
                return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.1)
        raise BenchError("the job API did not answer within 20s")


async def scrape(session: aiohttp.ClientSession, url: str) -> st.Samples | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
            return st.parse_prometheus(await response.text())
    except (aiohttp.ClientError, TimeoutError):
        return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total_s = sum(times)
    return total_s - idle, total_s


@dataclass
class Snapshot:
    wall: float
    server: dict[str, float]
    metrics: st.Samples
    apiserver: dict[str, float]
    cpu: dict[str, float | None]  # cumulative CPU seconds per process
    host: tuple[float, float]
    phases: dict[str, int]


@dataclass
class Run:
    """What one size's run needs while it goes; see `measure_size`."""

    opts: Options
    kube: Kube
    cluster: Cluster
    children: Children
    sa_kubeconfig: Path
    n: int
    interval: float
    http: aiohttp.ClientSession
    ports: list[int] = field(default_factory=list)  # the job API's, one per host
    jobs: JobApi | None = None
    jobapi: subprocess.Popen[bytes] | None = None
    operator: subprocess.Popen[bytes] | None = None
    operator_log: Path | None = None
    metrics_url: str = ""
    tag: str = ""
    plan: dict[str, Any] = field(default_factory=dict)  # load_plan's
    started_wall: float = 0.0  # the operator's start
    rss: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MiB)
    series: list[dict[str, Any]] = field(default_factory=list)

    def pids(self) -> dict[str, int | None]:
        return {
            "operator": self.operator.pid if self.operator else None,
            "jobapi": self.jobapi.pid if self.jobapi else None,
            "apiserver": self.cluster.pids.get("apiserver"),
            "etcd": self.cluster.pids.get("etcd"),
            "kcm": self.cluster.pids.get("kcm"),
            "harness": os.getpid(),
        }

    def check_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is not None:
            assert self.operator_log is not None
            raise BenchError(
                f"the operator exited with {self.operator.returncode} during the run; "
                f"log tail ({self.operator_log}):\n{tail(self.operator_log)}"
            )

    async def sleep(self, seconds: float) -> None:
        """Sleeps, failing early if the operator dies meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check_operator()
            await asyncio.sleep(min(1.0, left))
        self.check_operator()

    async def snapshot(self, fleet: FleetWatch) -> Snapshot:
        assert self.jobs is not None
        metrics = await scrape(self.http, self.metrics_url) if self.operator else None
        apiserver = st.apiserver_counters(await self.kube.text("/metrics"))
        # The fleet's phases at the snapshot's own time: the watch moves on while we await.
        wall, phases = time.time(), fleet.phases()
        return Snapshot(
            wall=wall,
            server=await self.jobs.stats(),
            metrics=metrics or {},
            apiserver=apiserver,
            cpu={name: cpu_seconds(pid) for name, pid in self.pids().items()},
            host=host_cpu(),
            phases=phases,
        )

    async def sample(self) -> None:
        """RSS every second; every --sample-every seconds a point of the time series.

        The operator's /metrics is scraped every 2 s for the queue gauge's maximum; the
        histogram and counters are differenced per point.
        """
        assert self.operator is not None and self.jobs is not None
        process = psutil.Process(self.operator.pid)
        every = self.opts.sample_every
        last_metrics: st.Samples = {}
        last_server = await self.jobs.stats()
        last_cpu = cpu_seconds(self.operator.pid) or 0.0
        last_point = time.time()
        queued: list[float] = []
        for tick in range(1, 1_000_000):
            await asyncio.sleep(max(0.0, self.started_wall + tick - time.time()))
            now = time.time()
            try:
                rss = process.memory_info().rss / MiB
            except psutil.Error:
                return
            self.rss.append((round(now - self.started_wall, 1), round(rss, 1)))
            if tick % 2 == 0:
                metrics = await scrape(self.http, self.metrics_url)
                if metrics:
                    queued.append(st.value(metrics, "jobwatch_polls_queued"))
                    if not last_metrics:
                        last_metrics = metrics
            if now - last_point < every - 0.5:
                continue
            metrics = await scrape(self.http, self.metrics_url) or {}
            server = await self.jobs.stats()
            cpu = cpu_seconds(self.operator.pid) or last_cpu
            span = now - last_point
            lag = st.bucket_delta(st.buckets(metrics, LAG), st.buckets(last_metrics, LAG))
            writes = st.diff(
                st.by_label(metrics, "jobwatch_status_writes_total", "result"),
                st.by_label(last_metrics, "jobwatch_status_writes_total", "result"),
            )
            p50, p99 = st.quantile(lag, 0.5), st.quantile(lag, 0.99)
            self.series.append(
                {
                    "t": round(now - self.started_wall, 1),
                    "polls_per_s": round((server["polls"] - last_server["polls"]) / span, 1),
                    "lag_p50_ms": None if p50 is None else round(p50 * 1000, 1),
                    "lag_p99_ms": None if p99 is None else round(p99 * 1000, 1),
                    "lag_max_le_ms": _ms(st.max_bound(lag)),
                    "queued_max": max(queued, default=None),
                    "queued_last": st.value(metrics, "jobwatch_polls_queued") if metrics else None,
                    "watches": st.value(metrics, "jobwatch_watches") if metrics else None,
                    "status_writes_per_s": round(writes.get("written", 0.0) / span, 2),
                    "rss_mib": round(rss, 1),
                    "operator_cores": round((cpu - last_cpu) / span, 3),
                    "distinct_polled": server["distinct"],
                    "completed": server["completed"],
                }
            )
            if metrics:
                last_metrics = metrics
            last_server, last_cpu, last_point, queued = server, cpu, now, []


def parse_seconds(text: str) -> float | None:
    """A duration like the operator's settings take: 10s, 500ms, 1m (enough for these)."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        number = text.strip().removesuffix(unit)
        if text.strip().endswith(unit) and number.replace(".", "", 1).isdigit():
            return float(number) * factor
    return None


_LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")


def log_summary(path: Path | None, top: int = 8) -> dict[str, Any]:
    """Warnings and errors in the operator's log, grouped with numbers and names masked."""
    counts: dict[str, int] = {}
    levels: dict[str, int] = {}
    if path is not None and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match is None:
                continue
            level, logger, message = match.groups()
            levels[level] = levels.get(level, 0) + 1
            shape = re.sub(r"\d+", "N", f"{level} {logger}: {message}")[:160]
            counts[shape] = counts.get(shape, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return {"by_level": levels, "top": [{"count": c, "message": m} for m, c in ranked]}


def _ms(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    if math.isinf(seconds):
        return "inf"
    return round(seconds * 1000, 1)


def load_plan(opts: Options, n: int, interval: float) -> dict[str, Any]:
    """What the run asks of the operator's concurrency, per host and in all.

    In flight by Little's law: polls/s x how long each holds a slot, which is the mean
    answer time, or the request timeout for a request never answered. The operator runs
    with its defaults, per-host limits included (a user's first run has no others), plus
    --operator-env.
    """
    rate = n / interval
    per_host = rate / opts.hosts
    first_round_per_host = max(rate, START_UP_POLLS_PER_S) / opts.hosts
    latency = jobapi.parse_latency(opts.latency)
    timeout = opts.request_timeout or DEFAULT_REQUEST_TIMEOUT
    held = None if latency is None else (1 - latency.hang) * latency.mean + latency.hang * timeout
    plan: dict[str, Any] = {
        "polls_per_s": round(rate, 1),
        "hosts": opts.hosts,
        "polls_per_s_per_host": round(per_host, 1),
        "first_round_polls_per_s_per_host": round(first_round_per_host, 1),
        "latency": None if latency is None else latency.spec(),
        "request_timeout_s": timeout,
        "mean_slot_s": None if held is None else round(held, 4),
        # docs/operations.md's rule of thumb: poll rate x typical (median) latency.
        "in_flight_median_rule": None if latency is None else math.ceil(rate * latency.median),
        "in_flight_littles_law": None if held is None else math.ceil(rate * held),
    }
    max_in_flight = int(
        opts.operator_env.get(
            "JOBWATCH_MAX_IN_FLIGHT",
            os.environ.get("JOBWATCH_MAX_IN_FLIGHT", str(DEFAULT_MAX_IN_FLIGHT)),
        )
    )
    plan["operator_env"] = dict(opts.operator_env)
    plan["max_in_flight"] = max_in_flight
    return plan


def operator_env(run: Run, health_port: int, metrics_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "KUBECONFIG": str(run.sa_kubeconfig),
        "JOBWATCH_NAMESPACES": NAMESPACE,
        "JOBWATCH_HEALTH_PORT": str(health_port),
        "JOBWATCH_METRICS_PORT": str(metrics_port),
        **run.plan["operator_env"],
    }


async def wait_all_polled(run: Run, limit: float) -> dict[str, Any]:
    """Until the job API has seen every job id once (or `limit` seconds passed)."""
    assert run.jobs is not None
    deadline = time.monotonic() + limit
    stats = await run.jobs.stats()
    told = time.monotonic()
    while stats["distinct"] < run.n and time.monotonic() < deadline:
        await run.sleep(0.25)
        stats = await run.jobs.stats()
        if time.monotonic() - told >= 10:
            told = time.monotonic()
            log(f"  {stats['distinct']:.0f} of {run.n} polled so far")
    done = stats["distinct"] >= run.n
    first = stats.get("first_poll") or None
    return {
        "all_polled_s": round(stats["last_first_poll"] - run.started_wall, 2) if done else None,
        "first_poll_s": round(first - run.started_wall, 2) if first else None,
        "polled": int(stats["distinct"]),
        "limit_s": round(limit, 1),
    }


async def compare_http_clients(run: Run, rate: float) -> dict[str, Any]:
    """Raw aiohttp, then jobwatch's HttpClient, each in its own process at `rate`/s."""
    assert run.jobs is not None
    seconds = run.opts.http_seconds
    warmup = 1.0 if run.opts.mode == "smoke" else 2.0
    found: dict[str, Any] = {}
    for key in ("raw", "jobwatch"):
        before = await run.jobs.stats()
        argv = [
            PYTHON,
            str(BENCH / "http_client_cpu.py"),
            "paced",
            "--client",
            key,
            "--url",
            f"{run.jobs.base}/api/jobs/x-{key}-{{}}/status",
            "--rate",
            f"{rate:g}",
            "--seconds",
            f"{seconds:g}",
            "--warmup",
            f"{warmup:g}",
            "--ids",
            str(run.n),
        ]
        async with asyncio.timeout(3 * (seconds + warmup) + 60):
            out = await run_command(argv)
        after = await run.jobs.stats()
        result = json.loads(out.strip().splitlines()[-1])
        served = after["probe_polls"] - before["probe_polls"]
        result["jobapi_cpu_ms_per_request"] = round(
            (after["cpu_s"] - before["cpu_s"]) / max(served, 1) * 1000, 4
        )
        found[key] = result
        log(
            f"  {result['client']}: {result['cpu_ms_per_request']:.3f} ms CPU/request at "
            f"{result['achieved_per_s']:.0f}/s, {result['errors']} errors"
        )
    raw, ours = found["raw"]["cpu_ms_per_request"], found["jobwatch"]["cpu_ms_per_request"]
    return {
        "rate": rate,
        "seconds": seconds,
        "raw": found["raw"],
        "jobwatch": found["jobwatch"],
        "ratio": round(ours / raw, 2) if raw else None,
    }


# --- one size -------------------------------------------------------------------------


@dataclass
class Context:
    """What every size's run shares."""

    opts: Options
    kube: Kube
    cluster: Cluster
    children: Children
    sa_kubeconfig: Path


async def measure_size(ctx: Context, n: int, interval: float) -> dict[str, Any]:
    opts, kube, cluster, children = ctx.opts, ctx.kube, ctx.cluster, ctx.children
    sa_kubeconfig = ctx.sa_kubeconfig
    tag = f"n{n}-i{go_duration(interval)}"
    log(f"== N={n}, interval {go_duration(interval)}: emptying {NAMESPACE}")
    await empty_namespace(kube)
    async with aiohttp.ClientSession() as http:
        run = Run(opts, kube, cluster, children, sa_kubeconfig, n, interval, http, tag=tag)
        run.plan = load_plan(opts, n, interval)
        while len(set(run.ports)) < opts.hosts:
            run.ports = list({*run.ports, free_port()})
        run.jobapi = children.start(
            [
                PYTHON,
                str(BENCH / "jobapi.py"),
                *(f"--port={port}" for port in run.ports),
                "--seed",
                str(opts.seed),
                # A job's length in seconds, from the base interval: --overload halves
                # the interval, not the jobs.
                "--mean-seconds",
                f"{opts.mean_polls * opts.interval:g}",
                "--pending-fraction",
                f"{opts.pending_fraction:g}",
                "--latency",
                opts.latency,
            ],
            LOGS / f"jobapi-{tag}.log",
        )
        run.jobs = JobApi(http, run.ports)
        fleet = FleetWatch(kube, n)
        tasks: list[asyncio.Task[None]] = []
        try:
            await run.jobs.wait_ready(run.jobapi)
            created_s = await create_watches(kube, n, run.ports, interval, opts)
            log(f"created {n} JobWatches in {created_s:.1f}s ({n / created_s:.0f}/s)")
            tasks.append(asyncio.create_task(fleet.run(), name="fleet-watch"))
            async with asyncio.timeout(120):
                await fleet.ready.wait()
            before = await run.snapshot(fleet)

            metrics_port, health_port = free_port(), free_port()
            run.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            run.operator_log = LOGS / f"operator-{tag}.log"
            run.operator_log.unlink(missing_ok=True)
            env = operator_env(run, health_port, metrics_port)
            # The operator's code is read now: record which (it may change between sizes).
            operator_git = git_state()
            run.started_wall = time.time()
            command = [PYTHON, "-m", "jobwatch"]
            if opts.profile:
                profile_out = LOGS / f"profile-{tag}"
                command = [PYTHON, str(BENCH / "sampling_profiler.py"), "--out", str(profile_out)]
                command += ["-m", "jobwatch"]
            run.operator = children.start(command, run.operator_log, env)
            tasks.append(asyncio.create_task(run.sample(), name="sampler"))
            log(f"operator started (pid {run.operator.pid}); waiting for every watch to poll")

            startup = await wait_all_polled(run, limit=max(60.0, 30 + n / 100))
            log(
                f"all {n} polled {startup['all_polled_s']}s after the operator's start"
                if startup["all_polled_s"] is not None
                else f"only {startup['polled']} of {n} polled within {startup['limit_s']}s"
            )
            # One more interval: the first-poll burst is not the steady state.
            await run.sleep(interval)
            log(f"steady window: {opts.duration:g}s")
            start = await run.snapshot(fleet)
            if opts.profile:
                run.operator.send_signal(signal.SIGUSR1)  # profile the window only
            await run.sleep(opts.duration)
            end = await run.snapshot(fleet)
            if opts.profile:
                run.operator.send_signal(signal.SIGUSR2)
            per_job = await run.jobs.per_job()
            requests = await run.jobs.request_times()
            delays = await run.jobs.request_delays()
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            shutdown_s, killed = await children.stop(run.operator, grace=30)
            exit_code = run.operator.returncode
            log(f"operator stopped in {shutdown_s:.1f}s (exit {exit_code}); HTTP client comparison")
            http_cpu = await compare_http_clients(run, rate=n / interval)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if run.operator is not None:
                await children.stop(run.operator, grace=30)
            if run.jobapi is not None:
                await children.stop(run.jobapi, grace=10)
    # Not waited for: the next size (or the next run) waits for an empty namespace.
    async with asyncio.timeout(300):
        await kube.request("DELETE", JW_PATH, ok=(200, 404))
    result = summarize(
        run,
        fleet=fleet,
        created_s=created_s,
        startup=startup,
        before=before,
        start=start,
        end=end,
        per_job=per_job,
        requests=requests,
        delays=delays,
        shutdown={
            "seconds": round(shutdown_s, 2),
            "killed": killed,
            "exit_code": exit_code,
            "budget_s": parse_seconds(env.get("JOBWATCH_SHUTDOWN_BUDGET", "10s")),
        },
        http_cpu=http_cpu,
    )
    result["git"] = operator_git
    return result


def lag_summary(h: st.Buckets) -> dict[str, Any]:
    p50, p99 = st.quantile(h, 0.5), st.quantile(h, 0.99)
    return {
        "count": int(st.total(h)),
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "max_le_ms": _ms(st.max_bound(h)),
        "within_50ms": st.fraction_within(h, TARGET_LAG_P99),
        "within_250ms": st.fraction_within(h, TARGET_LAG_MAX),
        "buckets": [[le if not math.isinf(le) else "+Inf", c] for le, c in h],
    }


def detection_summary(
    ends: list[tuple[int, float]], fleet: FleetWatch, seen_by: float, grace: float
) -> dict[str, Any]:
    """Detection latency of the jobs in `ends` ((watch index, the job's wall-clock end)).

    From the job's real end to the harness's watch seeing phase Succeeded. A job not seen
    by `seen_by` counts as infinitely late: a p99 that falls among those is reported as
    None (more than the grace), never as a smaller number.
    """
    values: list[float] = []
    missing = 0
    for i, ended in ends:
        seen = fleet.succeeded_at[i]
        if seen is not None and seen <= seen_by:
            values.append(max(0.0, seen - ended))
        else:
            missing += 1
    padded = values + [math.inf] * missing
    p50, p99 = st.percentile(padded, 0.5), st.percentile(padded, 0.99)
    return {
        "completed": len(padded),
        "detected": len(values),
        "undetected": missing,
        "p50_s": None if p50 is None or math.isinf(p50) else round(p50, 3),
        "p99_s": None if p99 is None or math.isinf(p99) else round(p99, 3),
        "max_s": round(max(values), 3) if values else None,
        "undetected_after_s": round(grace, 1),
    }


def span_figures(
    run: Run,
    a: Snapshot,
    b: Snapshot,
    *,
    fleet: FleetWatch,
    ends: list[tuple[int, float]],
    requests: dict[str, list[float]],
    delays: dict[str, list[float]],
    seen_by: float,
    grace: float,
) -> dict[str, Any]:
    """One span's figures, from snapshot a to snapshot b. `ends`: (watch index, end) of the
    jobs that ended inside the span, early enough to be seen by `seen_by`."""
    seconds = b.wall - a.wall
    polls = b.server["polls"] - a.server["polls"]
    op_cpu = (b.cpu["operator"] or 0.0) - (a.cpu["operator"] or 0.0)
    api = st.diff(b.apiserver, a.apiserver)
    dropped = st.value(b.metrics, "jobwatch_events_dropped_total") - st.value(
        a.metrics, "jobwatch_events_dropped_total"
    )
    reasons = st.diff(
        st.by_label(b.metrics, "jobwatch_polls_total", "reason"),
        st.by_label(a.metrics, "jobwatch_polls_total", "reason"),
    )
    late_after = run.interval * (1 + GAP_SPREAD) + TARGET_LAG_MAX
    gaps = st.gaps(requests, a.wall, b.wall)
    gap_summary = st.gap_summary(gaps, late_after)
    p99_bound = run.interval * (1 + GAP_SPREAD) + TARGET_LAG_P99
    gap_summary["within_p99_bound"] = (
        round(sum(1 for g in gaps if g <= p99_bound) / len(gaps), 6) if gaps else None
    )
    gap_summary["p99_bound_s"] = round(p99_bound, 3)
    from_answer, unanswered = st.answer_gaps(requests, delays, a.wall, b.wall)
    patches = api["status_patches"]
    held_back = {
        host: polls
        for host, polls in st.diff(
            st.by_label(b.metrics, "jobwatch_host_polls_delayed_total", "host"),
            st.by_label(a.metrics, "jobwatch_host_polls_delayed_total", "host"),
        ).items()
        if polls
    }
    waited = sum(
        st.diff(
            st.by_label(b.metrics, "jobwatch_host_poll_delay_seconds_total", "host"),
            st.by_label(a.metrics, "jobwatch_host_poll_delay_seconds_total", "host"),
        ).values()
    )
    return {
        "from_operator_start_s": round(a.wall - run.started_wall, 1),
        "to_operator_start_s": round(b.wall - run.started_wall, 1),
        "seconds": round(seconds, 2),
        "polls": int(polls),
        "polls_per_s": round(polls / seconds, 1) if seconds > 0 else None,
        "operator_cpu_s": round(op_cpu, 2),
        "operator_ms_per_poll": round(op_cpu / polls * 1000, 4) if polls else None,
        "operator_cores": round(op_cpu / seconds, 3) if seconds > 0 else None,
        "lag": lag_summary(st.bucket_delta(st.buckets(b.metrics, LAG), st.buckets(a.metrics, LAG))),
        # Request to request, as the job service sees them (the targets' figure) ...
        "gaps": gap_summary,
        # ... and from the answer to the next request: the same when answers are instant.
        "gaps_from_answer": {
            **st.gap_summary(from_answer, late_after),
            "after_unanswered_request": unanswered,
        },
        "detection": detection_summary(ends, fleet, seen_by, grace),
        # Polls the per-host limits held back (jobwatch_host_polls_delayed_total), by
        # host, and how long they waited in all: none while a limit never binds.
        "host_limit_delays": {
            "polls": int(sum(held_back.values())),
            "by_host": held_back,
            "seconds": round(waited, 2),
        },
        # As the API server counted them; the operator's own counters beside, to cross-check.
        "writes": {
            "status_patches": patches,
            "status_patch_failures": api["status_patch_failures"],
            "status_patches_per_s": round(patches / seconds, 2) if seconds > 0 else None,
            "status_patches_per_poll": round(patches / polls, 4) if polls else None,
            "events_created": api["events_created"],
            "event_failures": api["event_failures"],
            "events_dropped": dropped,
            "all_writes_by_verb": {
                k[6:]: v for k, v in api.items() if k.startswith("write ") and v
            },
            "operator_status_writes": st.diff(
                st.by_label(b.metrics, "jobwatch_status_writes_total", "result"),
                st.by_label(a.metrics, "jobwatch_status_writes_total", "result"),
            ),
            "operator_events_created": st.value(b.metrics, "jobwatch_events_created_total")
            - st.value(a.metrics, "jobwatch_events_created_total"),
        },
        "apiserver_429": api["429"],
        "apiserver_rejected_apf": api["rejected_apf"],
        "polls_by_reason": reasons,
        "http_errors": {r: reasons.get(r, 0.0) for r in HTTP_ERROR_REASONS},
    }


def summarize(
    run: Run,
    *,
    fleet: FleetWatch,
    created_s: float,
    startup: dict[str, Any],
    before: Snapshot,
    start: Snapshot,
    end: Snapshot,
    per_job: dict[str, list[Any]],
    requests: dict[str, list[float]],
    delays: dict[str, list[float]],
    shutdown: dict[str, Any],
    http_cpu: dict[str, Any],
) -> dict[str, Any]:
    n, interval = run.n, run.interval
    window = end.wall - start.wall
    polls = end.server["polls"] - start.server["polls"]
    if polls <= 0:
        raise BenchError("no poll reached the job API during the steady window")

    def cores(name: str, a: Snapshot = start, b: Snapshot = end) -> float | None:
        x, y = a.cpu.get(name), b.cpu.get(name)
        return None if x is None or y is None else round((y - x) / (b.wall - a.wall), 3)

    op_cpu_s = (end.cpu["operator"] or 0.0) - (start.cpu["operator"] or 0.0)
    jobapi_cpu = end.server["cpu_s"] - start.server["cpu_s"]
    host_busy = (end.host[0] - start.host[0]) / window
    measured = ("operator", "jobapi", "apiserver", "etcd", "kcm", "harness")
    known = sum(c for name in measured if (c := cores(name)) is not None)

    # Jobs whose real end fell in a span, early enough to be seen by the window's end if
    # detection met its target twice over; the end is the job API's wall-clock time.
    grace = 2 * (interval + TARGET_DETECTION_SLACK)
    ends: dict[str, list[tuple[int, float]]] = {"startup": [], "window": []}
    # The job's end to the first request after it (whose answer, COMPLETED, may have been
    # delayed or never sent with --latency): the wait for the next poll.
    next_request: list[float] = []
    for i in range(n):
        job = per_job.get(f"j{i}")
        ended = job[3] if job else None
        if ended is None or ended >= end.wall - grace:
            continue
        ends["window" if ended >= start.wall else "startup"].append((i, ended))
        if ended >= start.wall and job is not None and job[2] is not None:
            next_request.append(job[2] - ended)
    # The whole run as one span: from the operator's start (the snapshot just before it).
    at_start = dataclasses.replace(before, wall=run.started_wall)

    def figures_of(a: Snapshot, b: Snapshot, jobs_ended: list[tuple[int, float]]) -> dict[str, Any]:
        return span_figures(
            run,
            a,
            b,
            fleet=fleet,
            ends=jobs_ended,
            requests=requests,
            delays=delays,
            seen_by=end.wall,
            grace=grace,
        )

    spans = {
        "startup": figures_of(at_start, start, ends["startup"]),
        "window": figures_of(start, end, ends["window"]),
        "whole_run": figures_of(at_start, end, ends["startup"] + ends["window"]),
    }

    finished = [i for i in range(n) if (fleet.succeeded_at[i] or math.inf) <= end.wall]
    lifetime_writes = [fleet.modified[i] for i in finished]
    with_status = [t for t in fleet.status_at if t is not None and t <= end.wall]
    status_qps = float(run.plan["operator_env"].get("JOBWATCH_STATUS_QPS", DEFAULT_STATUS_QPS))
    status_burst = int(run.plan["operator_env"].get("JOBWATCH_STATUS_BURST", DEFAULT_STATUS_BURST))
    startup = {
        **startup,
        "all_status_s": round(max(with_status) - run.started_wall, 2)
        if len(with_status) == n
        else None,
        "with_status_at_window_start": sum(1 for t in with_status if t <= start.wall),
        "with_status_at_window_end": len(with_status),
        # The status budget (JOBWATCH_STATUS_QPS, _BURST) writes at most burst + qps x t
        # statuses in t seconds (Events have a budget of their own): the first status of
        # every watch cannot be out sooner.
        "all_status_budget_s": round(max(0, n - status_burst) / status_qps, 1),
        "status_qps": status_qps,
        "status_burst": status_burst,
    }

    op_rss = [mib for _, mib in run.rss]
    adopted = st.value(end.metrics, "jobwatch_watches")
    in_window = [mib for t, mib in run.rss if start.wall - run.started_wall <= t]
    writes = spans["window"]["writes"]
    result: dict[str, Any] = {
        "n": n,
        "interval_s": interval,
        "planned_polls_per_s": round(n / interval, 1),
        "load": run.plan,
        "create": {"seconds": round(created_s, 2), "per_s": round(n / created_s, 1)},
        "startup": startup,
        "window": {
            "seconds": round(window, 2),
            "start_after_operator_s": round(start.wall - run.started_wall, 1),
            "polls": int(polls),
            "polls_per_s": round(polls / window, 1),
            # Finished jobs poll no more: the rate the plan asks of the watches still active.
            "planned_active_polls_per_s": round(
                (n - (start.server["completed"] + end.server["completed"]) / 2) / interval, 1
            ),
            "completed_jobs": int(end.server["completed"] - start.server["completed"]),
            "polls_after_completion": int(
                end.server["after_completion"] - start.server["after_completion"]
            ),
            "answers_delayed": int(end.server["delayed"] - start.server["delayed"]),
            "requests_hung": int(end.server["hung"] - start.server["hung"]),
        },
        "spans": spans,
        # The window's jobs: the wait for the next poll after the end (job API's clock).
        "end_to_next_request": {
            "p50_s": st.rounded(st.percentile(next_request, 0.5)),
            "p99_s": st.rounded(st.percentile(next_request, 0.99)),
            "max_s": st.rounded(max(next_request, default=None)),
        },
        "rss": {
            "peak_mib": max(op_rss, default=None),
            "window_end_mib": in_window[-1] if in_window else None,
            "window_mean_mib": round(sum(in_window) / len(in_window), 1) if in_window else None,
            # With fewer watches adopted than created, the figures understate RSS at N.
            "complete": adopted >= n,
            "series": run.rss,
        },
        "cpu": {
            "operator_ms_per_poll": round(op_cpu_s / polls * 1000, 4),
            "operator_cores": cores("operator"),
            "jobapi_ms_per_request": round(jobapi_cpu / polls * 1000, 4),
            "jobapi_cores": round(jobapi_cpu / window, 3),
            "apiserver_cores": cores("apiserver"),
            "etcd_cores": cores("etcd"),
            "kcm_cores": cores("kcm"),
            "harness_cores": cores("harness"),
            "host_busy_cores": round(host_busy, 3),
            "other_processes_cores": round(host_busy - known, 3),
            "host_cpus": psutil.cpu_count(),
        },
        "status_writes": {
            "finished_watches": len(finished),
            "per_finished_watch_lifetime": round(sum(lifetime_writes) / len(finished), 2)
            if finished
            else None,
            "max_per_finished_watch": max(lifetime_writes, default=None),
            "watch_relists": fleet.relists,
            "phases_at_window_end": end.phases,
            "apiserver_vs_operator": {
                "apiserver_status_patches": writes["status_patches"],
                "operator_written": writes["operator_status_writes"].get("written", 0.0),
            },
        },
        "queued_max": max(
            (p["queued_max"] for p in run.series if p["queued_max"] is not None), default=None
        ),
        "watches_known": {
            "window_start": st.value(start.metrics, "jobwatch_watches"),
            "window_end": st.value(end.metrics, "jobwatch_watches"),
        },
        # The window is steady only if it began after every watch had polled once.
        "steady": startup["all_polled_s"] is not None,
        "http_client_cpu": http_cpu,
        "operator_shutdown": shutdown,
        "operator_log": log_summary(run.operator_log),
        "profile": str(LOGS / f"profile-{run.tag}.txt") if run.opts.profile else None,
        "series": run.series,
    }
    result["targets"] = targets(result, "window")
    result["targets_whole_run"] = targets(result, "whole_run")
    result["startup_targets"] = startup_targets(result)
    return result


# --- targets, overload verdict --------------------------------------------------------


def targets(r: dict[str, Any], span_name: str) -> list[dict[str, Any]]:
    """The issue's targets against one span's figures ("window" or "whole_run"); met is
    None when not measurable. RSS (peak), 429s and the start-up are whole-run figures in
    both lists."""
    interval = r["interval_s"]
    detection_limit = interval + TARGET_DETECTION_SLACK
    span = r["spans"][span_name]
    lag, det, gaps, writes = span["lag"], span["detection"], span["gaps"], span["writes"]
    per_poll, per_s = writes["status_patches_per_poll"], writes["status_patches_per_s"]
    cpu = span["operator_ms_per_poll"]
    whole = r["spans"]["whole_run"]
    rows: list[tuple[str, Any, Any, bool | None]] = [
        (
            f"RSS <= {TARGET_RSS_MIB:g} MiB (peak, whole run)",
            r["rss"]["peak_mib"],
            "MiB" if r["rss"]["complete"] else "MiB, a lower bound: not every watch adopted",
            rss_met(r["rss"]),
        ),
        (
            f"CPU per poll <= {TARGET_CPU_MS_PER_POLL} ms, all in",
            cpu,
            "ms",
            None if cpu is None else cpu <= TARGET_CPU_MS_PER_POLL,
        ),
        (
            "poll lag p99 <= 50 ms (operator's histogram)",
            lag["p99_ms"],
            "ms",
            None if lag["within_50ms"] is None else lag["within_50ms"] >= 0.99,
        ),
        (
            "poll lag max <= 250 ms (operator's histogram)",
            lag["max_le_ms"],
            "ms (bucket bound)",
            None if lag["within_250ms"] is None else lag["within_250ms"] >= 1.0,
        ),
        (
            f"gaps at the job service: p99 <= interval x 1.1 + 50 ms = {gaps['p99_bound_s']:g} s",
            gaps["p99_s"],
            "s",
            None if gaps["within_p99_bound"] is None else gaps["within_p99_bound"] >= 0.99,
        ),
        (
            f"gaps at the job service: none > interval x 1.1 + 250 ms = {gaps['late_after_s']:g} s",
            f"{gaps['late']} of {gaps['count']}, max {_fmt(gaps['max_s'], 3)} s"
            f" ({span['gaps_from_answer']['after_unanswered_request']} after a hung request)",
            "",
            None if not gaps["count"] else gaps["late"] == 0,
        ),
        (
            f"detection p99 (from the job's end) <= interval + 1 s = {detection_limit:g} s",
            det["p99_s"] if det["p99_s"] is not None else f"> {det['undetected_after_s']}",
            "s",
            None
            if det["completed"] == 0
            else det["p99_s"] is not None and det["p99_s"] <= detection_limit,
        ),
        (
            f"status writes <= {TARGET_WRITES_PER_POLL} per poll (API server's count)",
            per_poll,
            "",
            None if per_poll is None else per_poll <= TARGET_WRITES_PER_POLL,
        ),
        (
            f"status writes <= {TARGET_WRITES_PER_S:g}/s fleet-wide (API server's count)",
            per_s,
            "/s",
            None if per_s is None else per_s <= TARGET_WRITES_PER_S,
        ),
        (
            "no failed status write or Event, none dropped",
            f"{writes['status_patch_failures']:g} / {writes['event_failures']:g}"
            f" / {writes['events_dropped']:g}",
            "failed writes / failed Events / dropped Events",
            writes["status_patch_failures"] == 0
            and writes["event_failures"] == 0
            and writes["events_dropped"] == 0,
        ),
        (
            "zero API server 429s (whole run)",
            whole["apiserver_429"],
            "",
            whole["apiserver_429"] == 0,
        ),
        (
            f"all watches polled <= {TARGET_ALL_POLLING_S:g} s after operator start",
            r["startup"]["all_polled_s"]
            if r["startup"]["all_polled_s"] is not None
            else f"> {r['startup']['limit_s']}",
            "s",
            r["startup"]["all_polled_s"] is not None
            and r["startup"]["all_polled_s"] <= TARGET_ALL_POLLING_S,
        ),
        (
            f"HTTP CPU per request <= {TARGET_HTTP_RATIO:g}x raw aiohttp",
            r["http_client_cpu"]["ratio"],
            "x",
            None
            if r["http_client_cpu"]["ratio"] is None
            else r["http_client_cpu"]["ratio"] <= TARGET_HTTP_RATIO,
        ),
    ]
    return [
        {"target": name, "measured": measured, "unit": unit, "met": met}
        for name, measured, unit, met in rows
    ]


def startup_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every watch has a status no later than the status budget allows, plus an interval
    (the first poll) and 10 % of slack; not yet judged while the window ended earlier."""
    s = r["startup"]
    bound = s["all_status_budget_s"] * 1.1 + r["interval_s"]
    window_end = r["spans"]["whole_run"]["to_operator_start_s"]
    measured = s["all_status_s"]
    if measured is not None:
        met: bool | None = measured <= bound
    else:
        met = False if window_end > bound else None
    return [
        {
            "target": "every watch has a status"
            " <= (N - burst) / status QPS x 1.1 + interval"
            f" = {bound:g} s",
            "measured": measured
            if measured is not None
            else f"{r['n'] - s['with_status_at_window_end']} of {r['n']} without at {window_end:g}",
            "unit": "s",
            "met": met,
        }
    ]


def rss_met(rss: dict[str, Any]) -> bool | None:
    peak = rss["peak_mib"]
    if peak is None:
        return None
    if peak > TARGET_RSS_MIB:
        return False
    # Under the target, but with watches still missing the truth may lie above it.
    return True if rss["complete"] else None


def overload_verdict(r: dict[str, Any], base_interval: float) -> dict[str, Any]:
    """The issue's overload criteria, from a run at half the sustainable interval."""
    sustainable = r["n"] / base_interval
    achieved = r["window"]["polls_per_s"]
    errors = sum(r["spans"]["whole_run"]["http_errors"].values())
    points = [p for p in r["series"] if p["t"] >= r["window"]["start_after_operator_s"]]
    rates = sorted(p["polls_per_s"] for p in points)
    median = rates[len(rates) // 2] if rates else 0.0
    stalls = [p["t"] for p in points if p["polls_per_s"] < 0.5 * median]
    p99s = [p["lag_p99_ms"] for p in points if p["lag_p99_ms"] is not None]
    jumps = [
        points[k + 1]["t"]
        for k in range(len(p99s) - 1)
        if p99s[k + 1] > 2 * p99s[k] + 1000  # ms: doubled, and by more than a second
    ]
    queued = r["queued_max"]
    return {
        "sustainable_polls_per_s": round(sustainable, 1),
        "planned_polls_per_s": r["planned_polls_per_s"],
        "achieved_polls_per_s": achieved,
        "achieved_share_of_sustainable": round(achieved / sustainable, 3),
        "http_client_errors": errors,
        "queued_max": queued,
        "stalls_at_s": stalls,
        "lag_p99_jumps_at_s": jumps,
        "criteria": {
            "no client errors": errors == 0,
            ">= 90% of the sustainable capacity done": achieved >= 0.9 * sustainable,
            "lag grows smoothly (no stall, no p99 jump)": not stalls and not jumps,
            "queue bounded (<= N)": queued is not None and queued <= r["n"],
        },
    }


# --- output ---------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def figures(r: dict[str, Any]) -> list[tuple[str, str]]:
    """One run's figures as (label, text) rows, for the table on stdout. Every row that
    is not a whole-run figure names its span: [start-up], [window] or [whole run]."""
    startup, window, cpu = r["startup"], r["window"], r["cpu"]
    spans, writes, http, load = r["spans"], r["status_writes"], r["http_client_cpu"], r["load"]
    all_polled = (
        _fmt(startup["all_polled_s"], 2)
        if startup["all_polled_s"] is not None
        else f"{startup['polled']} in {startup['limit_s']:g}s"
    )
    all_status = (
        _fmt(startup["all_status_s"], 1)
        if startup["all_status_s"] is not None
        else f"{r['n'] - startup['with_status_at_window_end']} without"
    )

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    git = r.get("git") or {}
    commit = git.get("commit", "?")[:7] + ("+changes" if git.get("operator_changes") else "")
    env = load["operator_env"]
    rows = [
        ("operator commit", commit),
        ("watches (N)", str(r["n"])),
        ("interval", f"{r['interval_s']:g}s"),
        ("hosts; polls/s per host", f"{load['hosts']}; {load['polls_per_s_per_host']:g}"),
        (
            "operator settings (env)",
            ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "defaults",
        ),
        ("job API latency", load["latency"] or "none"),
        (
            "in flight: limit / Little's law",
            f"{load['max_in_flight']} / {_fmt(load['in_flight_littles_law'])}",
        ),
        (
            "polls/s planned / achieved [window]",
            f"{r['planned_polls_per_s']:g} / {window['polls_per_s']:g}",
        ),
        ("polls/s planned, active [window]", _fmt(window["planned_active_polls_per_s"])),
        (
            "create N JobWatches, s (/s)",
            f"{r['create']['seconds']:.1f} ({r['create']['per_s']:.0f})",
        ),
        ("[start-up] first poll, s", _fmt(startup["first_poll_s"], 2)),
        ("[start-up] all polled once, s", all_polled),
        (
            "[start-up] all have a status, s (budget)",
            f"{all_status} ({startup['all_status_budget_s']:g})",
        ),
        ("[start-up] span, s", _fmt(spans["startup"]["seconds"], 1)),
        ("window steady (all polled before)?", "yes" if r["steady"] else "NO"),
        (
            "watches known at window start / end",
            f"{r['watches_known']['window_start']:.0f} / {r['watches_known']['window_end']:.0f}",
        ),
        (
            "RSS peak [whole run] / window end, MiB",
            f"{_fmt(r['rss']['peak_mib'])} / {_fmt(r['rss']['window_end_mib'])}"
            + ("" if r["rss"]["complete"] else " (>=)"),
        ),
    ]
    labels = (("startup", "start-up"), ("window", "window"), ("whole_run", "whole run"))
    for key, name in labels:
        sp = spans[key]
        lag, gaps, det, w = sp["lag"], sp["gaps"], sp["detection"], sp["writes"]
        from_answer = sp["gaps_from_answer"]
        rows += [
            (
                f"[{name}] CPU ms/poll; cores",
                f"{_fmt(sp['operator_ms_per_poll'], 3)}; {_fmt(sp['operator_cores'], 2)}",
            ),
            (
                f"[{name}] lag p50 / p99 / max<=, ms",
                f"{_fmt(lag['p50_ms'])} / {_fmt(lag['p99_ms'])} / {_fmt(lag['max_le_ms'])}",
            ),
            (
                f"[{name}] lag <= 50 / <= 250 ms",
                f"{share(lag['within_50ms'])} / {share(lag['within_250ms'])}",
            ),
            (
                f"[{name}] gaps mean / p1 / p50 / p99 / max, s",
                f"{_fmt(gaps['mean_s'], 2)} / {_fmt(gaps['p1_s'], 2)} / "
                f"{_fmt(gaps['p50_s'], 2)} / {_fmt(gaps['p99_s'], 2)} / {_fmt(gaps['max_s'], 2)}",
            ),
            (
                f"[{name}] polls held by host limits; s waited",
                f"{sp['host_limit_delays']['polls']}; {sp['host_limit_delays']['seconds']:g}",
            ),
            (
                f"[{name}] gaps > {gaps['late_after_s']:g} s",
                f"{gaps['late']} ({share(gaps['late_share'])})",
            ),
            (
                f"[{name}] from answer p50 / p99 / max, s",
                " / ".join(_fmt(from_answer[k], 2) for k in ("p50_s", "p99_s", "max_s")),
            ),
            (f"[{name}] gaps after a hung request", str(from_answer["after_unanswered_request"])),
            (
                f"[{name}] detection p50 / p99 / max, s",
                f"{_fmt(det['p50_s'], 2)} / {_fmt(det['p99_s'], 2)} / {_fmt(det['max_s'], 2)}",
            ),
            (f"[{name}] detection seen / ended", f"{det['detected']} / {det['completed']}"),
            (
                f"[{name}] status PATCH/s; per poll",
                f"{_fmt(w['status_patches_per_s'], 2)}; {_fmt(w['status_patches_per_poll'], 4)}",
            ),
            (
                f"[{name}] Events created / dropped",
                f"{w['events_created']:g} / {w['events_dropped']:g}",
            ),
            (
                f"[{name}] failed PATCH / Event POST",
                f"{w['status_patch_failures']:g} / {w['event_failures']:g}",
            ),
            (
                f"[{name}] 429s; HTTP err T/H/I",
                f"{sp['apiserver_429']:g}; "
                + "/".join(f"{sp['http_errors'][k]:g}" for k in HTTP_ERROR_REASONS),
            ),
        ]
    rows += [
        ("status writes per finished watch", _fmt(writes["per_finished_watch_lifetime"], 2)),
        (
            "watches without status, window end",
            str(writes["phases_at_window_end"].get("(no status)", 0)),
        ),
        ("polls queued, max sampled", _fmt(r["queued_max"], 0)),
        (
            "answers delayed / hung [window]",
            f"{window['answers_delayed']} / {window['requests_hung']}",
        ),
        (
            "raw aiohttp / HttpClient ms/req",
            f"{http['raw']['cpu_ms_per_request']:.3f}"
            f" / {http['jobwatch']['cpu_ms_per_request']:.3f}",
        ),
        ("HttpClient / raw aiohttp", f"{_fmt(http['ratio'], 2)}x"),
        (
            "job API CPU ms/req; cores",
            f"{cpu['jobapi_ms_per_request']:.3f}; {cpu['jobapi_cores']:.2f}",
        ),
        (
            "kube-apiserver / etcd, cores",
            f"{_fmt(cpu['apiserver_cores'], 2)} / {_fmt(cpu['etcd_cores'], 2)}",
        ),
        (
            "host busy cores (others)",
            f"{cpu['host_busy_cores']:.2f} ({cpu['other_processes_cores']:.2f})",
        ),
        ("polls after COMPLETED (must be 0)", str(window["polls_after_completion"])),
        (
            "operator shutdown, s (budget)",
            f"{r['operator_shutdown']['seconds']:.1f} ({_fmt(r['operator_shutdown']['budget_s'])})",
        ),
        (
            "operator log warnings / errors",
            f"{r['operator_log']['by_level'].get('WARNING', 0)}"
            f" / {r['operator_log']['by_level'].get('ERROR', 0)}",
        ),
    ]
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"  { ({True: 'met', False: 'MISSED', None: 'n/a'}[t['met']]):<7} {t['target']:<72}"
        f" {_fmt(t['measured'], 3)} {t['unit']}"
        for t in rows
    ]


def table(result: dict[str, Any]) -> str:
    runs = [figures(r) for r in result["runs"]]
    labels = [label for label, _ in runs[0]]
    width = max(len(label) for label in labels)
    cell = max(14, *(len(text) for rows in runs for _, text in rows))
    lines = [
        f"{label:<{width}}  " + "  ".join(f"{rows[k][1]:>{cell}}" for rows in runs)
        for k, label in enumerate(labels)
    ]
    fit = result.get("fit")
    if fit:
        lines.append(
            f"RSS fit over N: {fit['kib_per_watch']:.1f} KiB per watch"
            f" + {fit['intercept_mib']:.1f} MiB"
            f" (projected at 10k: {fit['projected_10k_mib']:g} MiB)"
            + (f"; left out, not all adopted: N={fit['left_out']}" if fit["left_out"] else "")
        )
    headline = result.get("targets_at")
    if headline is not None:
        lines.append("")
        lines.append(f"targets (issue: 10,000 watches at 2,000 polls/s), at N={headline['n']}")
        lines.append("[window] steady window:")
        lines += verdicts(headline["targets"])
        lines.append("[whole run] operator start to the window's end:")
        lines += verdicts(headline["targets_whole_run"])
        lines.append("[start-up]:")
        lines += verdicts(headline["startup_targets"])
    over = result.get("overload")
    if over:
        lines.append("")
        lines.append(
            f"overload: planned {over['planned_polls_per_s']:g}/s, achieved "
            f"{over['achieved_polls_per_s']:g}/s = {over['achieved_share_of_sustainable']:.0%}"
            f" of the sustainable {over['sustainable_polls_per_s']:g}/s; queued max "
            f"{_fmt(over['queued_max'], 0)}; client errors {over['http_client_errors']:g}"
        )
        for name, ok in over["criteria"].items():
            lines.append(f"  {'met' if ok else 'MISSED':<7} {name}")
        lines.append("  t(s)  polls/s  lag p50 ms  lag p99 ms  queued max")
        for p in result["runs"][0]["series"]:
            lines.append(
                f"  {p['t']:>5.0f}  {p['polls_per_s']:>7.0f}  {_fmt(p['lag_p50_ms']):>10}  "
                f"{_fmt(p['lag_p99_ms']):>10}  {_fmt(p['queued_max'], 0):>10}"
            )
    return "\n".join(lines)


def plot_scale(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - a second of import time, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = result["runs"]
    ns = [r["n"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ns, [r["rss"]["peak_mib"] for r in runs], "o-", label="peak RSS")
    short = [r for r in runs if not r["rss"]["complete"]]
    if short:  # hollow: the operator had not adopted every watch, so RSS is understated
        left.plot(
            [r["n"] for r in short],
            [r["rss"]["peak_mib"] for r in short],
            "o",
            markerfacecolor="white",
            color="C0",
            label="not all watches adopted (>=)",
        )
    fit = result.get("fit")
    if fit:
        xs = [0, max(ns)]
        left.plot(
            xs,
            [fit["intercept_mib"] + fit["kib_per_watch"] * x / 1024 for x in xs],
            ":",
            label=f"fit: {fit['kib_per_watch']:.1f} KiB/watch",
        )
    left.axhline(TARGET_RSS_MIB, color="red", linestyle="--", label="target at 10k")
    left.set(xlabel="JobWatches", ylabel="operator RSS, MiB", title="memory", ylim=(0, None))
    left.legend()
    p99 = [r["spans"]["window"]["lag"]["p99_ms"] or 0.0 for r in runs]
    whole = [r["spans"]["whole_run"]["lag"]["p99_ms"] or 0.0 for r in runs]
    right.plot(ns, p99, "o-", label="poll lag p99, window")
    right.plot(ns, whole, "s--", label="poll lag p99, whole run")
    right.plot(
        ns, [r["spans"]["window"]["lag"]["p50_ms"] or 0.0 for r in runs], "o-", label="p50, window"
    )
    right.axhline(TARGET_LAG_P99 * 1000, color="red", linestyle="--", label="p99 target")
    if max(p99 + whole, default=0.0) > 20 * TARGET_LAG_P99 * 1000:
        right.set_yscale("log")
    right.set(xlabel="JobWatches", ylabel="ms", title="poll lag against plan")
    right.legend()
    interval = runs[0]["interval_s"]
    commits = sorted({(r.get("git") or result["git"])["commit"][:7] for r in runs})
    commit = ", ".join(commits)
    if any((r.get("git") or {}).get("operator_changes") for r in runs):
        commit += " + uncommitted operator changes"
    fig.suptitle(
        f"jobwatch scale benchmark, interval {interval:g}s, {result['started'][:16]}, {commit}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overload(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    r = result["runs"][0]
    series = r["series"]
    ts = [p["t"] for p in series]
    fig, (rate, lag, queue) = plt.subplots(1, 3, figsize=(14, 4))
    rate.plot(ts, [p["polls_per_s"] for p in series], label="achieved")
    rate.axhline(r["planned_polls_per_s"], color="gray", linestyle=":", label="planned")
    rate.axhline(
        result["overload"]["sustainable_polls_per_s"],
        color="red",
        linestyle="--",
        label="sustainable",
    )
    rate.set(xlabel="s since operator start", ylabel="polls/s", title="poll rate")
    rate.legend()
    lag.plot(ts, [p["lag_p50_ms"] for p in series], label="p50")
    lag.plot(ts, [p["lag_p99_ms"] for p in series], label="p99")
    lag.set(xlabel="s since operator start", ylabel="ms", title="poll lag (per 10 s)")
    lag.legend()
    queue.plot(ts, [p["queued_max"] for p in series])
    queue.axhline(r["n"], color="red", linestyle="--", label="N")
    queue.set(xlabel="s since operator start", ylabel="polls", title="jobwatch_polls_queued (max)")
    queue.legend()
    fig.suptitle(
        f"jobwatch overload: N={r['n']}, interval {r['interval_s']:g}s, {result['started'][:16]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(changed),
        # What the figures depend on; changes under bench/ or docs/ do not matter.
        "operator_changes": [p for p in changed if p.startswith(("operator/", "pyproject"))],
    }


def host_facts() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save_results(result: dict[str, Any], directory: Path, prefix: str) -> Path:
    """`<prefix>-<start time>.json` in `directory`; shared by every benchmark here."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = result["started"].replace(":", "").replace("-", "")[:15]
    path = directory / f"{prefix}-{stamp}.json"
    # Through a .tmp file (git-ignored), so a broken run never leaves half a file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def parse_operator_env(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """`--operator-env NAME=VALUE` options as a dict (a usage error otherwise)."""
    extra = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--operator-env {item!r}: expected NAME=VALUE")
        extra[name] = value
    return extra


def write_results(result: dict[str, Any], opts: Options) -> Path:
    prefix = "overload" if opts.mode == "overload" else "scale"
    path = save_results(result, opts.results_dir, prefix)
    latest = opts.results_dir / ("overload-latest.json" if prefix == "overload" else "latest.json")
    shutil.copyfile(path, latest)
    if opts.mode == "overload":
        plot_overload(result, opts.results_dir / "overload.png")
    else:
        plot_scale(result, opts.results_dir / "scale.png")
    return path


# --- main ---------------------------------------------------------------------------


async def bench(opts: Options, children: Children) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {
        "kind": opts.mode,
        "started": started.isoformat(timespec="seconds"),
        "git": git_state(),
        "host": host_facts(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "operator_env": {
            k: v
            for k, v in {**os.environ, **opts.operator_env}.items()
            if k.startswith("JOBWATCH_")
        },
        "runs": [],
    }
    if opts.mode == "overload":
        plan = [(max(opts.sizes), opts.interval / 2)]
    else:
        plan = [(n, opts.interval) for n in opts.sizes]
    cluster = await control_plane(opts)
    kube = Kube(load_kubeconfig(cluster.kubeconfig))
    try:
        await install(cluster)
        with tempfile.TemporaryDirectory(prefix="jobwatch-bench-") as tmp:
            ctx = Context(opts, kube, cluster, children, Path(tmp) / "operator.kubeconfig")
            await operator_kubeconfig(cluster, ctx.sa_kubeconfig)
            await ensure_namespace(kube)
            for n, interval in plan:
                result["runs"].append(await measure_size(ctx, n, interval))
    finally:
        await kube.aclose()
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    # Only runs in which the operator had adopted every watch: the others understate.
    points = [(r["n"], r["rss"]["peak_mib"]) for r in result["runs"] if r["rss"]["complete"]]
    fit = st.linear_fit(points)
    if fit is not None:
        slope, intercept = fit
        result["fit"] = {
            "kib_per_watch": round(slope * 1024, 2),
            "intercept_mib": round(intercept, 1),
            "projected_10k_mib": round(intercept + slope * 10_000, 1),
            "points": points,
            "left_out": [r["n"] for r in result["runs"] if not r["rss"]["complete"]],
        }
    headline = max(result["runs"], key=lambda r: (r["n"] == 10_000, r["n"]))
    result["targets_at"] = {
        "n": headline["n"],
        "targets": headline["targets"],
        "targets_whole_run": headline["targets_whole_run"],
        "startup_targets": headline["startup_targets"],
    }
    if opts.mode == "overload":
        result["overload"] = overload_verdict(result["runs"][0], opts.interval)
    return result


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="200 watches for 30 s: harness check")
    mode.add_argument(
        "--overload", action="store_true", help="the largest --sizes at half the --interval"
    )
    parser.add_argument("--sizes", default="100,200,1000,5000,10000", help="comma-separated N")
    parser.add_argument("--interval", type=float, default=5.0, help="spec.interval, seconds")
    parser.add_argument("--duration", type=float, default=None, help="steady window, s (120)")
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster (admin) instead")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mean-polls",
        type=float,
        default=None,
        help="mean length of a job that ends, in intervals (200; --smoke: 10)",
    )
    parser.add_argument(
        "--pending-fraction", type=float, default=0.2, help="jobs that never complete"
    )
    parser.add_argument("--create-concurrency", type=int, default=32)
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="job API ports, each a host to the operator (1; more: a multi-host run)",
    )
    parser.add_argument(
        "--latency",
        default="none",
        help="job API answer delays, e.g. lognormal:median=50ms,p99=1s,hang=0.5%% (none)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="spec.requestTimeout of every watch, s (default: the API's, 30 s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the operator under bench/sampling_profiler.py (_out/bench/profile-*.txt)",
    )
    parser.add_argument("--http-seconds", type=float, default=None, help="per client (20)")
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the operator (repeatable)",
    )
    args = parser.parse_args(argv)
    extra = parse_operator_env(parser, args.operator_env)
    try:
        jobapi.parse_latency(args.latency)
    except ValueError as exc:
        parser.error(str(exc))
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    smoke = bool(args.smoke)
    sizes = (200,) if smoke else tuple(int(s) for s in args.sizes.split(",") if s.strip())
    return Options(
        mode="smoke" if smoke else "overload" if args.overload else "scale",
        sizes=sizes,
        interval=args.interval,
        duration=args.duration if args.duration is not None else 30.0 if smoke else 120.0,
        kubeconfig=args.kubeconfig,
        # A smoke run must not replace the committed results.
        results_dir=args.results_dir or (LOGS if smoke else RESULTS),
        seed=args.seed,
        # A smoke run is short: its jobs must end within it, for detection to be measured.
        mean_polls=args.mean_polls if args.mean_polls is not None else 10.0 if smoke else 200.0,
        pending_fraction=args.pending_fraction,
        create_concurrency=args.create_concurrency,
        http_seconds=args.http_seconds if args.http_seconds is not None else 3.0 if smoke else 20.0,
        sample_every=10.0,
        profile=args.profile,
        operator_env=extra,
        hosts=args.hosts,
        latency=args.latency,
        request_timeout=args.request_timeout,
    )


def run_harness(
    name: str, run: Callable[[Children], Awaitable[dict[str, Any]]], *, own_cluster: bool
) -> dict[str, Any] | int:
    """Runs a harness (scale, soak, replicas): its result, or the exit code of a run that
    failed (1) or was interrupted (130). Its child processes, and the control plane if
    the harness started it, are stopped however the run ended."""
    children = Children()

    async def guarded() -> dict[str, Any]:
        # SIGTERM as Ctrl-C: cancel, so that every `finally` (and the cleanup) runs.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(children)

    try:
        return asyncio.run(guarded())
    except (BenchError, TimeoutError) as exc:
        log(f"{name} harness failed: {exc!r}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130
    finally:
        # Outside the event loop, so that it runs however the run ended.
        children.stop_all()
        if own_cluster:
            stop_control_plane()


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    result = run_harness(
        "benchmark", lambda children: bench(opts, children), own_cluster=opts.kubeconfig is None
    )
    if isinstance(result, int):
        return result
    if not any(r["window"]["polls"] > 0 for r in result["runs"]):
        log("no poll was measured")
        return 1
    path = write_results(result, opts)
    print(table(result))
    print(f"\nresults: {path}  ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
