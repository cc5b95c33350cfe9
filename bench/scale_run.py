"""One size of the scale benchmark: the fleet created, the operator started, sampled
through its windows, its figures summarized, everything stopped.

Part of bench/scale.py (no jobwatch layer).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

import benchstats as st
from benchenv import (
    BENCH,
    JW_PATH,
    LOGS,
    NAMESPACE,
    PYTHON,
    BenchError,
    MiB,
    go_duration,
    log,
    parse_seconds,
)
from controlplane import Cluster, empty_namespace
from fleet import FleetWatch, JobApi, Options, create_watches, load_plan
from kubeclient import Kube
from loopback import free_port
from procs import Children, run_command, sleep_checking, tail
from resultfiles import git_state
from sampling import cpu_seconds, host_cpu, scrape
from scale_figures import LAG, summarize, to_ms


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
        await sleep_checking(seconds, self.check_operator)

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
                    "lag_max_le_ms": to_ms(st.max_bound(lag)),
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


@dataclass
class Context:
    """What every size's run shares."""

    opts: Options
    kube: Kube
    cluster: Cluster
    children: Children
    sa_kubeconfig: Path


def start_jobapi(run: Run) -> subprocess.Popen[bytes]:
    """The job API for this size, on `run.ports`."""
    return run.children.start(
        [
            PYTHON,
            str(BENCH / "jobapi.py"),
            *(f"--port={port}" for port in run.ports),
            "--seed",
            str(run.opts.seed),
            # A job's length in seconds, from the base interval: --overload halves
            # the interval, not the jobs.
            "--mean-seconds",
            f"{run.opts.mean_polls * run.opts.interval:g}",
            "--pending-fraction",
            f"{run.opts.pending_fraction:g}",
            "--latency",
            run.opts.latency,
        ],
        LOGS / f"jobapi-{run.tag}.log",
    )


def start_operator(run: Run) -> tuple[dict[str, str], dict[str, Any]]:
    """Starts the operator (under the sampling profiler with --profile); its environment
    and the git state of the code it runs."""
    metrics_port, health_port = free_port(), free_port()
    run.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    run.operator_log = LOGS / f"operator-{run.tag}.log"
    run.operator_log.unlink(missing_ok=True)
    env = operator_env(run, health_port, metrics_port)
    # The operator's code is read now: record which (it may change between sizes).
    operator_git = git_state()
    run.started_wall = time.time()
    command = [PYTHON, "-m", "jobwatch"]
    if run.opts.profile:
        profile_out = LOGS / f"profile-{run.tag}"
        command = [PYTHON, str(BENCH / "sampling_profiler.py"), "--out", str(profile_out)]
        command += ["-m", "jobwatch"]
    run.operator = run.children.start(command, run.operator_log, env)
    return env, operator_git


async def steady_window(run: Run, fleet: FleetWatch) -> tuple[dict[str, Any], Snapshot, Snapshot]:
    """Waits for every watch to poll once, then one interval, then samples the steady
    window: (the start-up's figures, the window's first and last snapshots)."""
    startup = await wait_all_polled(run, limit=max(60.0, 30 + run.n / 100))
    log(
        f"all {run.n} polled {startup['all_polled_s']}s after the operator's start"
        if startup["all_polled_s"] is not None
        else f"only {startup['polled']} of {run.n} polled within {startup['limit_s']}s"
    )
    # One more interval: the first-poll burst is not the steady state.
    await run.sleep(run.interval)
    log(f"steady window: {run.opts.duration:g}s")
    start = await run.snapshot(fleet)
    if run.opts.profile:
        run.operator.send_signal(signal.SIGUSR1)  # profile the window only
    await run.sleep(run.opts.duration)
    end = await run.snapshot(fleet)
    if run.opts.profile:
        run.operator.send_signal(signal.SIGUSR2)
    return startup, start, end


async def records(
    jobs: JobApi,
) -> tuple[dict[str, list[Any]], dict[str, list[float]], dict[str, list[float]]]:
    """The job API's records: per job, every request's time, every answer's delay."""
    return await jobs.per_job(), await jobs.request_times(), await jobs.request_delays()


async def stop_operator(run: Run, env: dict[str, str]) -> dict[str, Any]:
    """SIGTERM, SIGKILL after 30 s: how long it took, against the shutdown budget."""
    assert run.operator is not None
    shutdown_s, killed = await run.children.stop(run.operator, grace=30)
    exit_code = run.operator.returncode
    log(f"operator stopped in {shutdown_s:.1f}s (exit {exit_code}); HTTP client comparison")
    return {
        "seconds": round(shutdown_s, 2),
        "killed": killed,
        "exit_code": exit_code,
        "budget_s": parse_seconds(env.get("JOBWATCH_SHUTDOWN_BUDGET", "10s")),
    }


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
        run.jobapi = start_jobapi(run)
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

            env, operator_git = start_operator(run)
            tasks.append(asyncio.create_task(run.sample(), name="sampler"))
            log(f"operator started (pid {run.operator.pid}); waiting for every watch to poll")

            startup, start, end = await steady_window(run, fleet)
            per_job, requests, delays = await records(run.jobs)
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            shutdown = await stop_operator(run, env)
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
        shutdown=shutdown,
        http_cpu=http_cpu,
    )
    result["git"] = operator_git
    return result
