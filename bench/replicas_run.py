"""The replicas benchmark's runs: the replicas started, settled and measured, the
failover, the rolling update and the start-up phases, the machine watched throughout.

Part of bench/replicas.py (no jobwatch layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

import benchenv
import benchstats as st
import controlplane
import fleet
import loopback
import procs
import resultfiles
import sampling
import scale_figures
from benchenv import MiB, log
from kubeclient import Kube
from replicas_figures import (
    DUPLICATE_SHARE,
    MONITOR_S,
    GiB,
    age_summary,
    apiserver_reads,
    duplicates,
    events_by_reason,
    in_flight_twice,
    job_of,
    jobs_of_buckets,
    longest_gap,
    settled,
    status_age,
    takeover,
    writes_by_resource,
)
from replicas_report import rollout_line, staleness_line, takeover_line, twice, window_line

# A cluster directory of its own: a scale run of another session may use bench-cluster.
CLUSTER_DIR = benchenv.REPO / ".cache" / "replicas-cluster"
LEASE_NAMESPACE = benchenv.OPERATOR_NAMESPACE
# operator/jobwatch/control/sharding/leases.py, GROUP_LABEL
LEASE_GROUP_LABEL = "jobwatch.dev/lease-group"
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
# A request that reaches the job service this soon after a replica was killed may have
# been sent before; no survivor can take a bucket that fast (it waits a lease duration).
IN_FLIGHT_S = 0.1
BASELINE_S = 15.0  # the control plane's own writes, measured with no replica running
LIST_PAGE = 500  # kubectl's page size


@dataclass(frozen=True)
class Options:
    replicas: tuple[int, ...]
    watches: int
    interval: float
    window: float
    buckets: int
    lease_duration: float
    renew_deadline: float
    retry_period: float
    hosts: int
    kubeconfig: Path | None
    results_dir: Path
    settle_limit: float  # seconds to wait for settled buckets, per run and after a kill
    operator_env: dict[str, str] = field(default_factory=dict)
    slow: int = 0  # jobs j0 ... j(slow-1) answer in slow_seconds (bench/jobapi.py --slow)
    slow_seconds: float = 10.0
    rollout: bool = False  # replace each replica in turn after the window (largest run)
    staleness_samples: int = 3  # LISTs of every JobWatch's status after the window
    min_available_gib: float = 2.0  # the run stops (and reports) below this much free memory


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return round(psutil.Process(pid).memory_info().rss / MiB, 1)
    except psutil.Error:
        return None


@dataclass
class Monitor:
    """The machine's memory and CPU every MONITOR_S, and the RSS of the control plane and
    of every process the harness started: what runs short first. Below `guard_gib` of
    available memory it cancels the run (which then reports what it has), before the
    kernel's OOM killer picks a process, maybe another user's."""

    guard_gib: float
    pids: dict[str, int]  # the control plane's
    samples: list[dict[str, Any]] = field(default_factory=list)
    ran_out: str | None = None

    def sample(self) -> dict[str, Any]:
        rss = {name: rss_mib(pid) for name, pid in self.pids.items()}
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                kind = "jobwatch" if "jobwatch" in child.cmdline() else Path(child.name()).name
                rss[f"{kind}:{child.pid}"] = round(child.memory_info().rss / MiB, 1)
        return {
            "wall": round(time.time(), 1),
            "available_gib": round(psutil.virtual_memory().available / GiB, 2),
            "cpu_busy": round(psutil.cpu_percent(None) / 100, 3),
            "rss_mib": {k: v for k, v in rss.items() if v is not None},
        }

    async def run(self, task: asyncio.Task[Any]) -> None:
        psutil.cpu_percent(None)  # starts the CPU count: the first sample covers MONITOR_S
        while True:
            await asyncio.sleep(MONITOR_S)
            found = await asyncio.to_thread(self.sample)
            self.samples.append(found)
            if self.ran_out is None and found["available_gib"] < self.guard_gib:
                self.ran_out = (
                    f"memory: {found['available_gib']} GiB available, under the "
                    f"--min-available-gib guard of {self.guard_gib:g}"
                )
                log(f"stopping the run: {self.ran_out}")
                task.cancel()

    def check(self) -> None:
        if self.ran_out is not None:
            raise benchenv.BenchError(self.ran_out)


@dataclass
class Replica:
    identity: str
    proc: subprocess.Popen[bytes]
    metrics_url: str
    log_path: Path
    process: psutil.Process

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class ReplicaState:
    """One scrape of a replica's /metrics, with psutil's view of its process."""

    wall: float
    polls: float
    cpu_s: float | None  # psutil, user + system
    cpu_metric_s: float  # process_cpu_seconds_total
    rss_mib: float | None
    held: frozenset[int]
    replicas: float | None  # jobwatch_replicas; None: not exported (no lease mode)
    share: float | None
    watches: float
    backlog: dict[str, float]  # jobwatch_status_backlog by kind


async def read_replica(http: aiohttp.ClientSession, replica: Replica) -> ReplicaState | None:
    samples = await sampling.scrape(http, replica.metrics_url)
    if samples is None:
        return None
    try:
        rss: float | None = replica.process.memory_info().rss / MiB
    except psutil.Error:
        rss = None
    names = {name for name, _ in samples}
    held = st.by_label(samples, "jobwatch_bucket_held", "bucket")
    return ReplicaState(
        wall=time.time(),
        polls=sum(st.by_label(samples, "jobwatch_polls_total", "reason").values()),
        cpu_s=sampling.cpu_seconds(replica.proc.pid),
        cpu_metric_s=st.value(samples, "process_cpu_seconds_total"),
        rss_mib=None if rss is None else round(rss, 1),
        held=frozenset(int(b) for b, v in held.items() if v >= 1),
        replicas=st.value(samples, "jobwatch_replicas") if "jobwatch_replicas" in names else None,
        share=st.value(samples, "jobwatch_bucket_share")
        if "jobwatch_bucket_share" in names
        else None,
        watches=st.value(samples, "jobwatch_watches"),
        backlog=st.by_label(samples, "jobwatch_status_backlog", "kind"),
    )


@dataclass
class Snapshot:
    wall: float
    replicas: dict[str, ReplicaState]
    apiserver: dict[str, float]  # benchstats.apiserver_counters + apiserver_reads
    cpu: dict[str, float | None]  # apiserver, etcd, jobapi: cumulative CPU seconds
    jobs: dict[str, float]  # the job API's /stats
    rss_mib: dict[str, float | None]  # apiserver, etcd, jobapi


@dataclass
class Stage:
    """What one run needs while it goes."""

    opts: Options
    ctx: Context
    http: aiohttp.ClientSession
    jobs: fleet.JobApi
    jobapi: subprocess.Popen[bytes]
    group: str
    replicas: list[Replica] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the JOBWATCH_* the replicas share
    stopped: set[str] = field(default_factory=set)  # replicas the harness killed or stopped

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]

    def check(self) -> None:
        self.ctx.monitor.check()
        for replica in self.replicas:
            if replica.identity not in self.stopped and not replica.alive():
                raise benchenv.BenchError(
                    f"replica {replica.identity} exited with {replica.proc.returncode}; "
                    f"log tail ({replica.log_path}):\n{procs.tail(replica.log_path)}"
                )
        if self.jobapi.poll() is not None:
            raise benchenv.BenchError(f"the job API exited with {self.jobapi.returncode}")

    async def states(self, replicas: Sequence[Replica] | None = None) -> dict[str, ReplicaState]:
        chosen = self.live() if replicas is None else replicas
        read = await asyncio.gather(*(read_replica(self.http, r) for r in chosen))
        return {r.identity: s for r, s in zip(chosen, read, strict=True) if s is not None}

    async def snapshot(self) -> Snapshot:
        text = await self.ctx.kube.text("/metrics")
        pids = self.ctx.cluster.pids
        return Snapshot(
            wall=time.time(),
            replicas=await self.states(),
            apiserver={**st.apiserver_counters(text), **apiserver_reads(text)},
            cpu={
                "apiserver": sampling.cpu_seconds(pids.get("apiserver")),
                "etcd": sampling.cpu_seconds(pids.get("etcd")),
                "jobapi": sampling.cpu_seconds(self.jobapi.pid),
            },
            jobs=await self.jobs.stats(),
            rss_mib={
                "apiserver": rss_mib(pids.get("apiserver")),
                "etcd": rss_mib(pids.get("etcd")),
                "jobapi": rss_mib(self.jobapi.pid),
            },
        )

    async def sleep(self, seconds: float) -> None:
        await procs.sleep_checking(seconds, self.check)


@dataclass
class Context:
    """What every run shares."""

    opts: Options
    kube: Kube
    cluster: controlplane.Cluster
    children: procs.Children
    sa_kubeconfig: Path
    ports: list[int]
    plan: dict[str, Any]  # fleet.load_plan's: the load, and --operator-env
    monitor: Monitor


def scale_options(opts: Options) -> fleet.Options:
    """bench/scale.py's options, for the helpers of its that read them."""
    return fleet.Options(
        mode="replicas",
        sizes=(opts.watches,),
        interval=opts.interval,
        duration=opts.window,
        kubeconfig=opts.kubeconfig,
        results_dir=opts.results_dir,
        seed=1,
        mean_polls=0.0,
        pending_fraction=1.0,
        create_concurrency=32,
        http_seconds=0.0,
        sample_every=10.0,
        profile=False,
        operator_env=opts.operator_env,
        hosts=opts.hosts,
    )


def operator_code() -> dict[str, Any]:
    """What the replicas of a run import: git's view, and a digest of the package's
    files, since the tree may change between runs while uncommitted work goes on."""
    digest = hashlib.sha256()
    for path in sorted((benchenv.REPO / "operator" / "jobwatch").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {**resultfiles.git_state(), "operator_sha256": digest.hexdigest()[:16]}


def lease_env(opts: Options, group: str) -> dict[str, str]:
    return {
        "JOBWATCH_LEASE_NAMESPACE": LEASE_NAMESPACE,
        "JOBWATCH_LEASE_GROUP": group,
        "JOBWATCH_BUCKETS": str(opts.buckets),
        "JOBWATCH_LEASE_DURATION": benchenv.go_duration(opts.lease_duration),
        "JOBWATCH_LEASE_RENEW_DEADLINE": benchenv.go_duration(opts.renew_deadline),
        "JOBWATCH_LEASE_RETRY_PERIOD": benchenv.go_duration(opts.retry_period),
    }


def start_replica(stage: Stage, k: int) -> Replica:
    identity = f"{stage.group}-r{k}"
    metrics_port = loopback.free_port()
    log_path = benchenv.LOGS / f"replica-{identity}.log"
    log_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "KUBECONFIG": str(stage.ctx.sa_kubeconfig),
        "JOBWATCH_NAMESPACES": benchenv.NAMESPACE,
        "JOBWATCH_HEALTH_PORT": str(loopback.free_port()),
        "JOBWATCH_METRICS_PORT": str(metrics_port),
        "JOBWATCH_IDENTITY": identity,
        **stage.env,
    }
    proc = stage.ctx.children.start([benchenv.PYTHON, "-m", "jobwatch"], log_path, env)
    return Replica(
        identity,
        proc,
        f"http://127.0.0.1:{metrics_port}/metrics",
        log_path,
        psutil.Process(proc.pid),
    )


async def wait_settled(stage: Stage, limit: float) -> dict[str, Any]:
    """Until the live replicas' metrics agree: every bucket held by exactly one of them and
    each seeing them all alive, twice in a row one retry period apart (or `limit` s).

    Without the lease metrics (an operator without replicas support) this ends at once:
    each replica then polls the whole fleet.
    """
    started = time.time()
    deadline = time.monotonic() + limit
    streak = 0
    states: dict[str, ReplicaState] = {}
    while time.monotonic() < deadline:
        stage.check()
        live = stage.live()
        states = await stage.states(live)
        if len(states) == len(live) and all(s.replicas is None for s in states.values()):
            return {"lease_mode": False, "settled": False, "after_s": None}
        agree = len(states) == len(live) and all(s.replicas == len(live) for s in states.values())
        if agree and settled({k: s.held for k, s in states.items()}, stage.opts.buckets):
            streak += 1
            if streak == 2:
                return {
                    "lease_mode": True,
                    "settled": True,
                    "after_s": round(time.time() - started, 1),
                    "held": {k: sorted(s.held) for k, s in states.items()},
                }
        else:
            streak = 0
        await asyncio.sleep(stage.opts.retry_period)
    return {
        "lease_mode": True,
        "settled": False,
        "after_s": None,
        "limit_s": limit,
        "held": {k: sorted(s.held) for k, s in states.items()},
        "replicas_seen": {k: s.replicas for k, s in states.items()},
    }


async def wait_polled_since(
    stage: Stage,
    jobs: Sequence[str],
    since: float,
    limit: float,
) -> dict[str, list[float]]:
    """Until every job in `jobs` had a request at `since` or later (or `limit` s); the
    job service's request records as last read (from `since` on, and the last request
    before). Read every 2 s, every 10 s at 100,000 jobs: each read costs the job service
    CPU in proportion to the jobs."""
    deadline = time.monotonic() + limit
    while True:
        requests = await stage.jobs.request_times(since=since)
        waiting = [j for j in jobs if not any(t >= since for t in requests.get(j, ())[-3:])]
        if not waiting or time.monotonic() >= deadline:
            if waiting:
                log(f"  {len(waiting)} of {len(jobs)} jobs not polled within {limit:.0f}s")
            return requests
        await stage.sleep(max(2.0, stage.opts.watches / 10_000))


async def wait_quiet(stage: Stage, limit: float) -> float | None:
    """Until no replica has phase changes, ends or Events queued (a fresh fleet's first
    statuses take N / JOBWATCH_STATUS_QPS seconds to go out); seconds it took, or None
    after `limit`. Progress writes of pending watches are always queued: not waited for."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        states = await stage.states()
        queued = sum(
            v for s in states.values() for kind, v in s.backlog.items() if kind != "progress"
        )
        if len(states) == len(stage.live()) and queued == 0:
            return round(time.monotonic() - started, 1)
        await stage.sleep(2.0)
    return None


def replica_figures(
    a: ReplicaState, b: ReplicaState, opts: Options, lease_mode: bool
) -> dict[str, Any]:
    n, interval = opts.watches, opts.interval
    seconds = b.wall - a.wall
    polls = b.polls - a.polls
    cpu = None if a.cpu_s is None or b.cpu_s is None else b.cpu_s - a.cpu_s
    owned = len(jobs_of_buckets(n, opts.buckets, b.held)) if lease_mode else n
    return {
        "polls": int(polls),
        "polls_per_s": round(polls / seconds, 1),
        # What its buckets ask for: the watches in them / interval.
        "planned_polls_per_s": round(owned / interval, 1),
        "watches_in_its_buckets": owned,
        "cpu_s": None if cpu is None else round(cpu, 2),
        "cpu_ms_per_poll": round(cpu / polls * 1000, 4) if cpu is not None and polls else None,
        "cores": None if cpu is None else round(cpu / seconds, 3),
        "cpu_metric_ms_per_poll": round((b.cpu_metric_s - a.cpu_metric_s) / polls * 1000, 4)
        if polls
        else None,
        "rss_mib": b.rss_mib,
        "buckets_held": len(b.held),
        "buckets": sorted(b.held),
        "held_unchanged_in_window": a.held == b.held,
        "replicas_seen": b.replicas,
        "share": b.share,
        "watches_known": b.watches,
        "status_backlog_at_start": a.backlog,
        "status_backlog_at_end": b.backlog,
    }


def window_figures(stage: Stage, a: Snapshot, b: Snapshot, lease_mode: bool) -> dict[str, Any]:
    opts = stage.opts
    seconds = b.wall - a.wall

    def cores(name: str) -> float | None:
        x, y = a.cpu.get(name), b.cpu.get(name)
        return None if x is None or y is None else round((y - x) / seconds, 3)

    per_replica = {
        k: replica_figures(a.replicas[k], b.replicas[k], opts, lease_mode)
        for k in b.replicas
        if k in a.replicas
    }
    service_polls = b.jobs["polls"] - a.jobs["polls"]
    reads = {
        k[5:]: round((b.apiserver.get(k, 0.0) - a.apiserver.get(k, 0.0)) / seconds, 3)
        for k in sorted(b.apiserver)
        if k.startswith("read ")
    }
    return {
        "seconds": round(seconds, 2),
        "job_service_polls_per_s": round(service_polls / seconds, 1),
        "planned_polls_per_s": round(opts.watches / opts.interval, 1),
        "replicas_polls_per_s_sum": round(sum(r["polls_per_s"] for r in per_replica.values()), 1),
        "per_replica": per_replica,
        "apiserver_cores": cores("apiserver"),
        "etcd_cores": cores("etcd"),
        "jobapi_cores": cores("jobapi"),
        "apiserver_writes_per_s": writes_by_resource(b.apiserver, a.apiserver, seconds),
        "apiserver_reads_per_s": reads,
        "open_watches": {k[5:]: v for k, v in b.apiserver.items() if k.startswith("open ")},
        "apiserver_429": b.apiserver.get("429", 0.0) - a.apiserver.get("429", 0.0),
        "read_bytes_per_s": {
            k[6:]: round((b.apiserver.get(k, 0.0) - a.apiserver.get(k, 0.0)) / seconds)
            for k in sorted(b.apiserver)
            if k.startswith("bytes ")
        },
        # At the window's end; CPU above in cores (CPU seconds per second).
        "rss_mib": b.rss_mib,
    }


def gap_figures(
    requests: Mapping[str, Sequence[float]], start: float, end: float, interval: float
) -> dict[str, Any]:
    gaps = st.gaps(requests, start, end)
    polled = sum(1 for times in requests.values() if any(start <= t < end for t in times))
    return {
        **st.gap_summary(gaps, interval * 1.1 + scale_figures.TARGET_LAG_MAX),
        "duplicates": duplicates(requests, start, end, interval),
        "duplicate_below_s": round(DUPLICATE_SHARE * interval, 3),
        "jobs_polled": polled,
    }


async def stop_replica(
    stage: Stage, victim: Replica, how: str, survivors: Sequence[Replica]
) -> dict[str, Any]:
    """Kill (-9) or SIGTERM `victim` and measure how the survivors take its jobs over."""
    opts = stage.opts
    before = await stage.states([victim, *survivors])
    if victim.identity not in before:
        raise benchenv.BenchError(f"replica {victim.identity} did not answer before its {how}")
    held = before[victim.identity].held
    jobs = jobs_of_buckets(opts.watches, opts.buckets, held)
    log(f"{how} {victim.identity}: {len(held)} buckets, {len(jobs)} watches")
    stage.stopped.add(victim.identity)
    at = time.time()
    if how == "kill":
        victim.proc.kill()
    else:
        victim.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        await asyncio.to_thread(victim.proc.wait)
    exited = time.time()
    # After a kill nothing more comes from the victim; after SIGTERM it stops its polls,
    # flushes and releases its Leases before it exits: only requests after its exit are
    # surely the survivors'.
    survivors_from = at + IN_FLIGHT_S if how == "kill" else exited
    limit = opts.lease_duration + 3 * opts.retry_period + 3 * opts.interval + 30
    requests = await wait_polled_since(stage, jobs, survivors_from, limit)
    # One more interval: a duplicate poll right after the takeover is seen too.
    await stage.sleep(opts.interval)
    until = time.time()
    # From an interval before: `takeover` counts duplicates from then on.
    requests = await stage.jobs.request_times(since=at - opts.interval)
    spans = await stage.jobs.request_spans(since=at)
    figures = takeover(
        requests, jobs, at=at, survivors_from=survivors_from, until=until, interval=opts.interval
    )
    return {
        "how": "kill -9" if how == "kill" else "SIGTERM",
        "replica": victim.identity,
        "survivors": [r.identity for r in survivors],
        "buckets": sorted(held),
        "exit_code": victim.proc.returncode,
        "exited_after_s": round(exited - at, 2),
        "survivor_requests_counted_from_s": round(survivors_from - at, 2),
        "measured_until_s": round(until - at, 1),
        **figures,
        "duplicates_whole_fleet": duplicates(requests, at, until, opts.interval),
        # The whole fleet: a request of the stopped replica's still out when a survivor
        # polls the same job, or a survivor's two.
        "in_flight_twice": in_flight_twice(spans, at, until, time.time()),
    }


async def join(stage: Stage) -> dict[str, Any]:
    """A replica joins: the others hand it its share, bucket by bucket, each handover
    waiting a while for the polls in flight; the slow jobs' outlast that wait."""
    opts = stage.opts
    at = time.time()
    newcomer = start_replica(stage, len(stage.replicas))
    stage.replicas.append(newcomer)
    log(f"{newcomer.identity} joins")
    settle = await wait_settled(stage, opts.settle_limit)
    # Then an interval and an answer: a taker's first request of a slow job is in them.
    await stage.sleep(opts.interval + opts.slow_seconds)
    spans = await stage.jobs.request_spans(since=at)
    found = {
        "how": "join",
        "replica": newcomer.identity,
        "settled": settle["settled"],
        "settled_after_s": settle["after_s"],
        "measured_until_s": round(time.time() - at, 1),
        "in_flight_twice": in_flight_twice(spans, at, time.time(), time.time()),
    }
    log(
        f"  join {newcomer.identity}: settled {settle['settled']} after {settle['after_s']}s, "
        f"in flight twice {twice(found['in_flight_twice'])}"
    )
    return found


async def failover(stage: Stage) -> dict[str, Any]:
    opts = stage.opts
    found: dict[str, Any] = {}
    if opts.slow:
        found["join"] = await join(stage)
    first, second, *rest = stage.live()
    found["kill"] = await stop_replica(stage, first, "kill", [second, *rest])
    log(takeover_line(found["kill"]))
    settle = await wait_settled(stage, opts.settle_limit)
    found["settled_after_kill"] = settle
    log(f"after the kill: settled {settle['settled']} ({settle['after_s']}s)")
    if not rest:
        found["sigterm"] = "skipped: no replica would be left to take over (2 replicas)"
    elif not settle["settled"]:
        found["sigterm"] = "skipped: the survivors did not settle after the kill"
    else:
        found["sigterm"] = await stop_replica(stage, second, "sigterm", rest)
        log(takeover_line(found["sigterm"]))
    return found


async def wait_first_polls(stage: Stage, started: float, limit: float) -> dict[str, Any]:
    """Until the job service has seen a request of every job: the time from the
    replicas' start (`started`) to the first request of the last job (the job
    service's clock, the harness's machine)."""
    deadline = time.monotonic() + limit
    while True:
        stats = await stage.jobs.stats()
        done = stats["distinct"] >= stage.opts.watches
        if done or time.monotonic() >= deadline:
            first = stats["first_poll"]
            return {
                "jobs_polled": int(stats["distinct"]),
                "first_poll_after_s": round(first - started, 1) if first else None,
                "all_polled_after_s": round(stats["last_first_poll"] - started, 1)
                if done
                else None,
                "limit_s": limit,
            }
        await stage.sleep(1.0)


async def status_ages(kube: Kube) -> tuple[list[float], int, float]:
    """One LIST of every JobWatch, paginated as kubectl does: the age of each status
    (`status_age`) when its page arrived, how many had no lastPollTime, the seconds the
    LIST took. Page by page, so the harness never holds the whole fleet."""
    ages: list[float] = []
    missing = 0
    params = {"limit": str(LIST_PAGE)}
    started = time.monotonic()
    while True:
        listed = await kube.request("GET", benchenv.JW_PATH, params=params)
        now = time.time()
        for item in listed.get("items") or []:
            age = status_age(item, now)
            if age is None:
                missing += 1
            else:
                ages.append(age)
        token = listed["metadata"].get("continue")
        if not token:
            return ages, missing, time.monotonic() - started
        params = {"limit": str(LIST_PAGE), "continue": token}


async def staleness(stage: Stage) -> dict[str, Any]:
    """How old the progress is that a user reads with kubectl, at steady state: a few
    LISTs over one interval right after the window (so that the window's API server
    figures do not include them)."""
    opts = stage.opts
    every = opts.interval / opts.staleness_samples
    samples: list[dict[str, Any]] = []
    pooled: list[float] = []
    missing = 0
    began = time.time()
    for k in range(opts.staleness_samples):
        if k:
            await stage.sleep(max(0.0, began + k * every - time.time()))
        at = time.time()
        ages, without, took = await status_ages(stage.ctx.kube)
        samples.append(
            {
                "after_window_s": round(at - began, 1),
                "list_s": round(took, 2),
                **age_summary(ages, without, opts.interval),
            }
        )
        pooled.extend(ages)
        missing += without
    return {"samples": samples, "all": age_summary(pooled, missing, opts.interval)}


async def wait_share(stage: Stage, newcomer: Replica, limit: float) -> int | None:
    """Until `newcomer` holds its share of the buckets, buckets // live replicas (its own
    jobwatch_bucket_held): the buckets it then holds, None after `limit` s."""
    target = stage.opts.buckets // len(stage.live())
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = (await stage.states([newcomer])).get(newcomer.identity)
        if state is not None and len(state.held) >= target:
            return len(state.held)
        await stage.sleep(1.0)
    return None


async def rollout_step(stage: Stage, old: Replica) -> dict[str, Any]:
    """One step of a RollingUpdate with maxSurge 1, maxUnavailable 0: a new replica,
    and once it holds its share, SIGTERM of `old`; until the buckets settle again."""
    opts = stage.opts
    at = time.time()
    new = start_replica(stage, len(stage.replicas))
    stage.replicas.append(new)
    held = await wait_share(stage, new, opts.settle_limit)
    step: dict[str, Any] = {"new": new.identity, "old": old.identity, "new_pid": new.proc.pid}
    if held is None:
        # A Deployment would wait here for good: the rollout stops.
        return {**step, "holds_share_after_s": None, "settled": False}
    step.update(holds_share_after_s=round(time.time() - at, 1), buckets_of_new=held)
    stage.stopped.add(old.identity)
    stopped = time.time()
    old.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        await asyncio.to_thread(old.proc.wait)
    step["old_exited_after_sigterm_s"] = round(time.time() - stopped, 2)
    settle = await wait_settled(stage, opts.settle_limit)
    step.update(settled=settle["settled"], step_s=round(time.time() - at, 1))
    return step


async def rollout(stage: Stage) -> dict[str, Any]:
    """Replaces every replica in turn (`rollout_step`); what it cost the API server and
    the job service, from the rollout's start until one interval after its end (a job
    it left unpolled shows its gap at its next poll)."""
    opts = stage.opts
    old = stage.live()
    log(f"rollout: replacing {len(old)} replicas one by one")
    a = await stage.snapshot()
    steps: list[dict[str, Any]] = []
    for replica in old:
        steps.append(await rollout_step(stage, replica))
        log(f"  rollout step: {steps[-1]}")
        if not steps[-1]["settled"]:
            break
    b = await stage.snapshot()
    await stage.sleep(opts.interval)
    until = time.time()
    requests = await stage.jobs.request_times(since=a.wall)
    spans = await stage.jobs.request_spans(since=a.wall)

    def delta(prefix: str) -> dict[str, float]:
        return {
            k[len(prefix) :]: b.apiserver.get(k, 0.0) - a.apiserver.get(k, 0.0)
            for k in sorted(b.apiserver)
            if k.startswith(prefix)
        }

    return {
        "completed": len(steps) == len(old) and all(s["settled"] for s in steps),
        "duration_s": round(b.wall - a.wall, 1),
        "steps": steps,
        "apiserver_requests": delta("read "),
        "apiserver_bytes": delta("bytes "),
        "apiserver_writes": writes_by_resource(b.apiserver, a.apiserver, 1.0),
        "apiserver_cpu_s": None
        if a.cpu["apiserver"] is None or b.cpu["apiserver"] is None
        else round(b.cpu["apiserver"] - a.cpu["apiserver"], 1),
        "job_service_measured_until_s": round(until - a.wall, 1),
        "duplicates": duplicates(requests, a.wall, until, opts.interval),
        "in_flight_twice": in_flight_twice(spans, a.wall, until, time.time()),
        "longest_gap": longest_gap(requests, a.wall, until),
    }


async def measure(ctx: Context, count: int, largest: bool, run: dict[str, Any]) -> None:
    """One run with `count` replicas; its figures go into `run` as they are measured, so
    that a run cut short (something ran out) still reports what it got."""
    opts = ctx.opts
    group = f"bench-{secrets.token_hex(3)}"
    log(f"== {count} replica(s), lease group {group}")
    async with aiohttp.ClientSession() as http:
        jobapi_proc = ctx.children.start(
            [
                benchenv.PYTHON,
                str(benchenv.BENCH / "jobapi.py"),
                *(f"--port={port}" for port in ctx.ports),
                "--pending-fraction",
                "1",
                f"--slow={opts.slow}",
                f"--slow-seconds={opts.slow_seconds:g}",
            ],
            benchenv.LOGS / f"jobapi-replicas-{group}.log",
        )
        stage = Stage(opts, ctx, http, fleet.JobApi(http, ctx.ports), jobapi_proc, group)
        stage.env = {**ctx.plan["operator_env"], **lease_env(opts, group)}
        try:
            await stage.jobs.wait_ready(jobapi_proc)
            run.update(lease_group=group, operator_code=operator_code())
            await run_phases(stage, count, largest, run)
            stops = await asyncio.gather(
                *(ctx.children.stop(r.proc, grace=30) for r in stage.live())
            )
            run["shutdown_s"] = [round(s, 2) for s, _ in stops]
            run["shutdown_killed"] = [killed for _, killed in stops]
        finally:
            for replica in stage.replicas:
                await ctx.children.stop(replica.proc, grace=30)
            await ctx.children.stop(jobapi_proc, grace=10)
            # Not waited for: the next run's group is a fresh one.
            await ctx.kube.request(
                "DELETE",
                LEASES_PATH,
                params={"labelSelector": f"{LEASE_GROUP_LABEL}={group}"},
                ok=(200, 404),
            )


async def start_up(stage: Stage, count: int, run: dict[str, Any]) -> float:
    """Starts the replicas and waits until every job was polled once and the buckets
    settled; the wall-clock time of the start."""
    opts = stage.opts
    started = time.time()
    stage.replicas = [start_replica(stage, k) for k in range(count)]
    run["identities"] = [r.identity for r in stage.replicas]
    run["pids"] = {r.identity: r.proc.pid for r in stage.replicas}
    log(f"started {count} replica(s); waiting for settled buckets and every job polled")
    limit = opts.settle_limit + 2 * opts.interval
    settle, first = await asyncio.gather(
        wait_settled(stage, opts.settle_limit), wait_first_polls(stage, started, limit)
    )
    run["settle"], run["start_up"] = settle, first
    log(
        f"settled: {settle['settled']} after {settle['after_s']}s (lease mode: "
        f"{settle['lease_mode']}); every job polled once after {first['all_polled_after_s']}s"
    )
    all_jobs = [job_of(i) for i in range(opts.watches)]
    since = time.time()
    requests = await wait_polled_since(
        stage, all_jobs, since, opts.settle_limit + 2 * opts.interval
    )
    run["polled_after_settle"] = sum(
        1 for j in all_jobs if any(t >= since for t in requests.get(j, ()))
    )
    quiet = await wait_quiet(
        stage, max(opts.settle_limit, 2 * opts.watches / scale_figures.DEFAULT_STATUS_QPS)
    )
    run["queues_empty_after_s"] = quiet
    log(
        f"status and Event queues empty after {quiet}s"
        if quiet is not None
        else "status and Event queues still not empty: measuring anyway"
    )
    return started


async def run_phases(stage: Stage, count: int, largest: bool, run: dict[str, Any]) -> None:
    opts = stage.opts
    started = await start_up(stage, count, run)
    # One more interval: the first polls after a takeover are not the steady state.
    await stage.sleep(opts.interval)
    log(f"steady window: {opts.window:g}s")
    start = await stage.snapshot()
    await stage.sleep(opts.window)
    end = await stage.snapshot()
    requests = await stage.jobs.request_times(since=start.wall)
    spans = await stage.jobs.request_spans(since=started)
    window = window_figures(stage, start, end, run["settle"]["lease_mode"])
    window["gaps"] = gap_figures(requests, start.wall, end.wall, opts.interval)
    window["in_flight_twice"] = in_flight_twice(spans, start.wall, end.wall, time.time())
    # From the replicas' start to the window: the buckets change hands as they settle
    # (replicas started together take more than their share at first).
    run["settle"]["in_flight_twice"] = in_flight_twice(spans, started, start.wall, time.time())
    del requests, spans  # at 100,000 jobs, hundreds of MB
    events, _ = await stage.ctx.kube.list_all(benchenv.EVENTS_PATH)
    # Whole seconds: Event times have no fractions.
    window["events_by_reason"] = events_by_reason(events, int(start.wall), int(end.wall) + 1)
    run["window_start_after_start_s"] = round(start.wall - started, 1)
    run["window"] = window
    log(window_line(run))
    if opts.staleness_samples:
        run["staleness"] = await staleness(stage)
        log(" " + staleness_line(run["staleness"]["all"]))
    if not largest:
        return
    if opts.rollout:
        run["rollout"] = await rollout(stage)
        log(rollout_line(run["rollout"]))
    if len(stage.live()) < 2:
        return
    if run["settle"]["settled"]:
        run["failover"] = await failover(stage)
    else:
        run["failover"] = "skipped: the buckets never settled"


async def baseline(ctx: Context) -> dict[str, Any]:
    """The control plane's own writes and CPU with no replica running."""
    a_text, a_wall = await ctx.kube.text("/metrics"), time.time()
    a_cpu = sampling.cpu_seconds(ctx.cluster.pids.get("apiserver"))
    await asyncio.sleep(BASELINE_S)
    b_text, b_wall = await ctx.kube.text("/metrics"), time.time()
    b_cpu = sampling.cpu_seconds(ctx.cluster.pids.get("apiserver"))
    seconds = b_wall - a_wall
    return {
        "seconds": round(seconds, 1),
        "apiserver_cores": None
        if a_cpu is None or b_cpu is None
        else round((b_cpu - a_cpu) / seconds, 3),
        "apiserver_writes_per_s": writes_by_resource(
            st.apiserver_counters(b_text), st.apiserver_counters(a_text), seconds
        ),
        "open_watches": {
            k[5:]: v for k, v in apiserver_reads(b_text).items() if k.startswith("open ")
        },
    }


async def fleet_runs(
    opts: Options,
    *,
    kube: Kube,
    cluster: controlplane.Cluster,
    children: procs.Children,
    plan: dict[str, Any],
    monitor: Monitor,
    result: dict[str, Any],
) -> None:
    """Creates the fleet, then one run per replica count; the figures go into `result`."""
    sopts = scale_options(opts)
    await controlplane.install(cluster)
    with tempfile.TemporaryDirectory(prefix="jobwatch-replicas-") as tmp:
        sa_kubeconfig = Path(tmp) / "operator.kubeconfig"
        await controlplane.operator_kubeconfig(cluster, sa_kubeconfig)
        await controlplane.ensure_namespace(kube)
        await controlplane.empty_namespace(kube)
        ports: list[int] = []
        while len(set(ports)) < opts.hosts:
            ports = list({*ports, loopback.free_port()})
        created = await fleet.create_watches(kube, opts.watches, ports, opts.interval, sopts)
        log(f"created {opts.watches} JobWatches in {created:.1f}s")
        result["create_s"] = round(created, 1)
        result["create_per_s"] = round(opts.watches / created, 1)
        ctx = Context(opts, kube, cluster, children, sa_kubeconfig, ports, plan, monitor)
        result["baseline"] = await baseline(ctx)
        largest = max(opts.replicas)
        for count in opts.replicas:
            run: dict[str, Any] = {"replicas": count}
            result["runs"].append(run)
            await measure(ctx, count, count == largest, run)
