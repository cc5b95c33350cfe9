"""Operator CPU per status write, its watch-event echo included, against a real API server.

    .venv/bin/python bench/status_writes.py                      # local control plane
    .venv/bin/python bench/status_writes.py --kubeconfig .cache/cluster/admin.kubeconfig
    .venv/bin/python bench/status_writes.py --rate 18 --writes 540 --profile _out/bench/sw

What one status write costs the operator, measured on its own: this process is the
operator's status path and nothing else, built from the operator's own parts:
jobwatch's KubeApi (logged in with a token of the operator's ServiceAccount), its
Informer feeding a Runtime's `observe` (so that each write's echo, the MODIFIED event of
the object, is taken in as the operator takes it in), and a StatusWriter whose token
bucket paces the writes at --rate (the operator's budget is 18/s). No polling happens.

1. N JobWatches are created in a namespace of their own (admin token); the informer
   lists them and the runtime adopts them; each is written once (whole), so that what
   follows is what a running operator writes: progress of a known status.
2. Idle: the process's CPU for --idle seconds with the watch open and nothing written;
   then what waking the idle process costs at the write rate (asyncio.sleep(1/rate) in
   a loop), for scale: a write wakes it at least three times (for its token, the
   answer, the echo); docs/benchmarks.md has what these cost.
3. Window: --writes progress writes (attempts, lastPollTime, nextPollTime and
   lastResponse change, as after a poll), round-robin over the N watches, until the
   informer has seen the echo of every one. The process's CPU over the window
   (time.process_time), minus the idle rate over the same time, divided by the writes:
   "CPU per write, echo included". The API server's own count of status PATCHes over the
   window (apiserver_request_total) is printed next to ours, and must match.

Results: _out/bench/results/status-writes-<timestamp>.json. Only loopback is used. To
measure another version of the operator's code, put its package first on PYTHONPATH
(the harness uses only interfaces that version has too).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf
import uvloop
import yaml

import jobwatch
from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.status.writer import StatusWriter
from jobwatch.core.policy import Phase
from jobwatch.core.watch import Watch
from jobwatch.jobservice.client import HttpClient
from jobwatch.jobservice.egress import EgressPolicy
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import KubeApi
from jobwatch.kube.informer import Informer
from kubeclient import Kube, KubeError, load_kubeconfig
from sampling_profiler import Sampler

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "_out" / "bench" / "results"  # git-ignored; see docs/benchmarks.md
CLUSTER = REPO / ".cache" / "status-writes-cluster"
NAMESPACE = "jobwatch-status-writes"
GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
JW_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
OPERATOR_NAMESPACE, OPERATOR_SA = "jobwatch-system", "jobwatch-operator"
PATCHES = re.compile(
    r'^apiserver_request_total\{(?=[^}]*resource="jobwatches")(?=[^}]*subresource="status")'
    r'(?=[^}]*verb="PATCH")[^}]*\} (\S+)$',
    re.M,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: Sequence[str], env: Mapping[str, str] | None = None, stdin: str = "") -> str:
    done = subprocess.run(
        command, input=stdin, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def start_cluster() -> Path:
    env = {**os.environ, "JOBWATCH_CLUSTER_DIR": str(CLUSTER)}
    log(run([str(REPO / "hack/cluster-up.sh")], env).strip().splitlines()[0])
    return CLUSTER / "admin.kubeconfig"


def stop_cluster() -> None:
    env = {**os.environ, "JOBWATCH_CLUSTER_DIR": str(CLUSTER)}
    subprocess.run([str(REPO / "hack/cluster-down.sh")], env=env, capture_output=True, check=False)


def install(admin: Path, out: Path) -> None:
    """The CRD and the operator's RBAC (not its Deployment), and a kubeconfig with a
    token of the operator's ServiceAccount."""
    kubectl = str(Path(run([str(REPO / "hack/build-controlplane.sh")]).strip()) / "kubectl")
    base = [kubectl, "--kubeconfig", str(admin)]
    docs = [
        d
        for d in yaml.safe_load_all(run([*base, "kustomize", str(REPO / "manifests")]))
        if d and d.get("kind") != "Deployment"
    ]
    run([*base, "apply", "--server-side", "--force-conflicts", "-f", "-"], None,
        yaml.safe_dump_all(docs))  # fmt: skip
    run([*base, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}"])
    env = {**os.environ, "KUBECTL": kubectl}
    run([str(REPO / "hack/sa-kubeconfig.sh"), OPERATOR_NAMESPACE, OPERATOR_SA, str(out),
         str(admin)], env)  # fmt: skip


async def fresh_namespace(kube: Kube, n: int) -> None:
    await kube.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        ok=(201, 409),
    )
    await kube.request("DELETE", JW_PATH, ok=(200, 404))
    for _ in range(240):  # the API server deletes a collection in the background
        if not (await kube.request("GET", JW_PATH, params={"limit": "1"})).get("items"):
            break
        await asyncio.sleep(0.5)
    else:
        raise RuntimeError(f"JobWatches in {NAMESPACE} were not deleted within 120 s")
    names = iter(range(n))

    async def create() -> None:
        for i in names:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "JobWatch",
                "metadata": {"name": f"w{i:05d}"},
                "spec": {
                    "url": f"http://127.0.0.1:9/api/jobs/j{i}/status",
                    "successWhen": 'response.body.status == "COMPLETED"',
                    "failureWhen": 'response.body.status == "FAILED"',
                    "result": {"link": "response.body.resultLink"},
                    "timeout": "1h",
                },
            }
            await kube.request("POST", JW_PATH, body=body, ok=(201,))

    await asyncio.gather(*(create() for _ in range(16)))


async def apiserver_patches(kube: Kube) -> float:
    text = await kube.text("/metrics")
    return sum(float(value) for value in PATCHES.findall(text))


def progress(watch: Watch, wall: float) -> None:
    """What a pending poll changes in a watch."""
    watch.phase, watch.reason = Phase.POLLING, "Polling"
    watch.message = "job still running: neither condition matched (HTTP 200)"
    watch.attempts += 1
    watch.last_poll_time = wall
    watch.next_poll_time = wall + 5
    body = f'{{"id": "j1", "status": "PROCESSING", "progress": {watch.attempts}}}'
    watch.last_response = {"code": 200, "latencyMs": random.randint(1, 9), "body": body}


class Echoes:
    """Counts the MODIFIED events of the watched JobWatches on their way to observe()."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime, self.count = runtime, 0
        self.changed = asyncio.Event()

    def observe(self, kind: str, body: Mapping[str, Any]) -> None:
        self.runtime.observe(kind, body)
        if kind == "MODIFIED":
            self.count += 1
            self.changed.set()

    async def until(self, count: int, limit: float) -> None:
        async with asyncio.timeout(limit):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "operator")),
    }


def make_writer(
    args: argparse.Namespace, api: KubeApi, loop: asyncio.AbstractEventLoop
) -> StatusWriter:
    return StatusWriter(
        api,
        Metrics(),
        qps=args.rate,
        # Paced: one write per token. Progress: the operator's own budget.
        burst=50 if args.progress else 1,
        event_qps=1,  # no Events here
        event_burst=1,
        progress_interval=15.0,
        wall=time.time,
        clock=loop.time,
        identity="bench",
    )


async def idle_cost(
    args: argparse.Namespace, loop: asyncio.AbstractEventLoop
) -> tuple[float, float]:
    """(cores this process uses idle, ms of CPU per wakeup at the write rate)."""
    idle_cpu, idle_start = time.process_time(), loop.time()
    await asyncio.sleep(args.idle)
    idle_rate = (time.process_time() - idle_cpu) / (loop.time() - idle_start)
    # What merely waking this process costs at the write rate, for scale: a write
    # wakes it at least three times (its token, the answer, the echo).
    wakeups = int(args.idle * args.rate)
    wake_cpu = time.process_time()
    for _ in range(wakeups):
        await asyncio.sleep(1 / args.rate)
    return idle_rate, 1000 * (time.process_time() - wake_cpu) / wakeups


async def write_once(
    args: argparse.Namespace, watches: list[Watch], writer: StatusWriter, echoes: Echoes
) -> None:
    """Each watch written once, whole: the window then writes progress of a known status."""
    for watch in watches:
        progress(watch, time.time())
        writer.submit(watch, urgent=True)
    await echoes.until(len(watches), limit=60 + len(watches) / args.rate)
    await asyncio.sleep(1)


async def poll_round(watches: list[Watch], writer: StatusWriter, second: int) -> None:
    """As the operator writes progress: every watch "polled" every 5 s (a fifth of them
    each second), a write falling due 15 s after its object's last one."""
    for watch in watches[second % 5 :: 5]:
        progress(watch, time.time())
        writer.submit(watch, urgent=False)


async def paced_writes(
    args: argparse.Namespace,
    watches: list[Watch],
    writer: StatusWriter,
    echoes: Echoes,
    before: int,
) -> None:
    """--writes writes, a round of all watches at a time; `before`: the echoes so far."""
    for i in range(args.writes):
        watch = watches[i % len(watches)]
        progress(watch, time.time())
        writer.submit(watch, urgent=True)
        if i % len(watches) == len(watches) - 1:  # one round queued: let it drain
            await echoes.until(before + i + 1, limit=60 + len(watches) / args.rate)
    await echoes.until(before + args.writes, limit=60 + args.writes / args.rate)


async def window(
    args: argparse.Namespace,
    kube: Kube,
    watches: list[Watch],
    writer: StatusWriter,
    echoes: Echoes,
) -> dict[str, Any]:
    """The measured writes: their CPU (process, event loop thread, kernel), the window's
    length, the writes, and the API server's count of them."""
    loop = asyncio.get_running_loop()
    sampler = Sampler(0.002, Path(args.profile)) if args.profile else None
    before = echoes.count
    patches_before = await apiserver_patches(kube)
    if sampler is not None:
        sampler.start()
    cpu, thread_cpu, start = time.process_time(), time.thread_time(), loop.time()
    times = os.times()
    if args.progress:
        for second in range(args.warmup, args.warmup + args.seconds):
            await poll_round(watches, writer, second)
            await asyncio.sleep(1)
    else:
        await paced_writes(args, watches, writer, echoes, before)
    cpu, seconds = time.process_time() - cpu, loop.time() - start
    thread_cpu = time.thread_time() - thread_cpu
    ended = os.times()
    if sampler is not None:
        sampler.stop()
        sampler.report()
    return {
        "cpu": cpu,
        "thread_cpu": thread_cpu,
        "seconds": seconds,
        "system": ended.system - times.system,
        "patches": await apiserver_patches(kube) - patches_before,
        # Progress: the echoes seen in the window (writes on their way at its ends differ).
        "writes": echoes.count - before if args.progress else args.writes,
        "echoes_before": before,
    }


async def measure(args: argparse.Namespace, admin: Path, operator: Path) -> dict[str, Any]:
    kube = Kube(load_kubeconfig(admin))
    await fresh_namespace(kube, args.watches)
    log(f"created {args.watches} JobWatches in {NAMESPACE}")
    os.environ["KUBECONFIG"] = str(operator)
    settings = kopf.OperatorSettings()

    def credentials() -> kopf.ConnectionInfo:
        info = kopf.login_with_kubeconfig(settings=settings)
        assert info is not None
        return info

    api = KubeApi(credentials)
    http = HttpClient(EgressPolicy())
    loop = asyncio.get_running_loop()
    runtime = Runtime(Config.from_env({"JOBWATCH_NAMESPACES": NAMESPACE}), api, http, Metrics())
    echoes = Echoes(runtime)
    informer = Informer(api, (NAMESPACE,), (), observe=echoes.observe, keep_only=runtime.keep_only)
    writer = make_writer(args, api, loop)
    tasks = [asyncio.create_task(informer.run()), asyncio.create_task(writer.run())]
    try:
        async with asyncio.timeout(60):
            await informer.synced.wait()
        watches = [runtime.watches[key] for key in sorted(runtime.watches)]
        assert len(watches) == args.watches, len(watches)
        await write_once(args, watches, writer, echoes)
        idle_rate, wake_ms = await idle_cost(args, loop)
        if args.progress:
            for second in range(args.warmup):  # until the writes run as they will
                await poll_round(watches, writer, second)
                await asyncio.sleep(1)
        w = await window(args, kube, watches, writer, echoes)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.scheduler.stop()
        await http.aclose()
        await api.aclose()
        await kube.aclose()
    cpu, seconds, writes = w["cpu"], w["seconds"], w["writes"]
    net = cpu - idle_rate * seconds
    return {
        "mode": "progress" if args.progress else "paced",
        "watches": args.watches,
        "rate_per_s": args.rate,
        "writes": writes,
        "echoes": echoes.count - w["echoes_before"],
        "apiserver_status_patches": w["patches"],
        "window_s": round(seconds, 2),
        "writes_per_s": round(writes / seconds, 1),
        "cpu_s": round(cpu, 4),
        "event_loop_thread_cpu_s": round(w["thread_cpu"], 4),
        # In the kernel: the syscalls of sockets and of each wakeup.
        "system_cpu_s": round(w["system"], 3),
        "idle_cores": round(idle_rate, 5),
        "cpu_ms_per_write": round(1000 * cpu / writes, 3),
        "cpu_ms_per_write_net_of_idle": round(1000 * net / writes, 3),
        "cpu_ms_per_wakeup_at_rate": round(wake_ms, 3),
    }


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, help="an admin kubeconfig (else: own cluster)")
    parser.add_argument("--watches", type=int, default=100, help="JobWatches written in turn")
    parser.add_argument("--writes", type=int, default=540, help="writes in the window")
    parser.add_argument("--rate", type=float, default=18.0, help="writes/s (budget: 18)")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="write progress as the operator does (due 15 s after each object's last write,"
        " burst 50) instead of paced urgent writes; --rate is then the budget",
    )
    parser.add_argument("--seconds", type=int, default=60, help="--progress: window, seconds")
    parser.add_argument("--warmup", type=int, default=30, help="--progress: before the window")
    parser.add_argument("--idle", type=float, default=10.0, help="idle baseline, seconds")
    parser.add_argument("--profile", help="write a CPU profile of the window to PROFILE.txt")
    parser.add_argument("--label", default="", help="a word for the results (before, after)")
    args = parser.parse_args(argv)
    own = args.kubeconfig is None
    admin = start_cluster() if own else args.kubeconfig.resolve()
    try:
        operator = REPO / "_out" / "bench" / "status-writes-operator.kubeconfig"
        operator.parent.mkdir(parents=True, exist_ok=True)
        install(admin, operator)
        # The operator's event loop (__main__.py).
        figures = uvloop.new_event_loop().run_until_complete(measure(args, admin, operator))
    finally:
        if own:
            stop_cluster()
    result = {
        "kind": "status-writes",
        "label": args.label,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "jobwatch_from": str(Path(jobwatch.__file__).parent),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"status-writes-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    print(f"results: {path.relative_to(REPO)}")
    # Progress mode counts echoes over the window: writes in flight at its ends differ.
    if not args.progress and figures["apiserver_status_patches"] != figures["writes"]:
        print("warning: writes, echoes and the API server's count differ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (KubeError, RuntimeError, TimeoutError) as exc:
        print(f"status_writes: {exc}", file=sys.stderr)
        sys.exit(1)
