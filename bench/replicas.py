"""Scale-out benchmark (issue #9): one fleet shared by 1, 2, 3 operator replicas through Leases.

    .venv/bin/python bench/replicas.py                   # 3,000 watches; 1, 2, 3 replicas
    .venv/bin/python bench/replicas.py --watches 600 --replicas 1,2 --window 20
    .venv/bin/python bench/replicas.py --kubeconfig .cache/test-cluster/admin.kubeconfig ...
    .venv/bin/python bench/replicas.py --slow 20 --slow-seconds 10   # issue #20
    .venv/bin/python bench/replicas.py --watches 100000 --replicas 4 --interval 60 --rollout

The pieces of bench/scale.py (control plane, CRD and RBAC, the operator's ServiceAccount
token, child processes, the job API of bench/jobapi.py) in this order:

1. the namespace jobwatch-bench is emptied and --watches JobWatches are created (each
   with --interval, its job pending for good), once for all runs;
2. one run per --replicas count, each with a fresh job API (on the same ports), a fresh
   lease group (JOBWATCH_LEASE_GROUP: no run sees another's Leases) and fresh operator
   processes, all started at once with JOBWATCH_LEASE_NAMESPACE=jobwatch-system;
3. start-up: from the replicas' start until the job service has seen a request of
   every job, and until the buckets are settled (from the replicas' own metrics: every
   bucket held by exactly one replica, every replica seeing them all alive); then until
   every job was polled after that and no replica has phase changes or Events queued
   (a fresh fleet's first statuses take N / (replicas x JOBWATCH_STATUS_QPS) seconds),
   one more interval, then a steady window: polls, gaps, CPU (cores: CPU seconds per
   second) and RSS of each replica, of the kube-apiserver, etcd and the job service;
4. staleness (--staleness-samples, 3): right after the window, so that the window's
   API server figures do not include them, a few paginated LISTs of every JobWatch over
   one interval: the distribution of now - status.lastPollTime, how old the progress is
   that a user reads with kubectl;
5. in the largest run, with --rollout: each replica replaced in turn as a Deployment's
   RollingUpdate with maxSurge 1, maxUnavailable 0 does it (a new replica; once it holds
   buckets // replicas buckets, SIGTERM of an old one; until settled): its duration,
   the API server's JobWatch LISTs and GETs and the bytes of their answers
   (apiserver_response_sizes_sum deltas), duplicate polls, two requests in flight at
   once and the longest gap of any job, from its start until one interval after its end;
6. in the largest run (2 replicas or more), after that: `kill -9` of one replica,
   then, once the others have settled, SIGTERM of another; for each, from the job
   service's records, how long until every job of its buckets was polled again, the
   longest gap of those jobs across the change, and whether any job was polled twice.

All along, the machine's available memory and CPU and the RSS of the control plane and
of every process the harness started are sampled every 5 s: the results tell what ran
short first (memory: under --min-available-gib or a tenth of the machine; CPU: every
core 95 % busy for a minute). Under --min-available-gib (2) the run stops, before the
kernel's OOM killer picks a process. A run that stops early (that, an API server that
times out, a replica that dies) still writes its results with what it measured and why
it stopped.

--slow N (default 0) makes the jobs of the watches w00000 ... w(N-1) answer in
--slow-seconds (10): longer than a replica's handover waits for its polls in flight
(issue #20). A replica then also joins after the window, before the kill (a rebalance:
the others hand it buckets while slow polls are out). For each phase (settling, the
steady window, the join, the kill -9, the SIGTERM) the results tell how many jobs had
two requests in flight at once, from the job service's records (a request is in flight
from its arrival until its answer is written or its client closed the connection), and
the longest such overlap; it should be 0 with or without --slow.

Every figure is measured from outside the replicas wherever possible: gaps and polls at
the job service (the time between two requests for one job; a gap under 0.9 x interval
is a duplicate poll, since the pending interval's spread is +-10 %); writes as the API
server counted them (apiserver_request_total deltas, beside the same counts over a span
with no replica running: the control plane's own writes); CPU and RSS of each replica
and of the kube-apiserver process by psutil (only when that process runs on this
machine: with --kubeconfig naming another cluster, the API server's CPU is not known).

Results: _out/bench/results/replicas-<timestamp>.json and a table on stdout; logs in
_out/bench/. Exit status 0 when the harness did its job whatever the figures, 1 when it
broke or stopped early (results written all the same, with "failed"). Everything it
starts is stopped at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import itertools
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
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
import runner
import sampling
import scale_figures
from kubeclient import Kube, KubeError, load_kubeconfig

# A cluster directory of its own: a scale run of another session may use bench-cluster.
CLUSTER_DIR = benchenv.REPO / ".cache" / "replicas-cluster"
LEASE_NAMESPACE = benchenv.OPERATOR_NAMESPACE
LEASE_GROUP_LABEL = "jobwatch.dev/lease-group"  # operator/jobwatch/leases.py, GROUP_LABEL
LEASES_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
# Two requests of one job closer than this share of the interval: a duplicate poll
# (the pending interval is planned within +-10 %, API.md).
DUPLICATE_SHARE = 0.9
# A request that reaches the job service this soon after a replica was killed may have
# been sent before; no survivor can take a bucket that fast (it waits a lease duration).
IN_FLIGHT_S = 0.1
BASELINE_S = 15.0  # the control plane's own writes, measured with no replica running
MiB = 1024 * 1024
GiB = 1024 * MiB
MONITOR_S = 5.0  # how often the machine's memory and CPU are sampled
# The machine is short of CPU once all its cores are this busy for SATURATED_S or more.
SATURATED_BUSY = 0.95
SATURATED_S = 60.0
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


log = benchenv.log


# --- pure figures (tests/unit/test_replicas_bench.py) ------------------------------


def bucket_of(name: str, buckets: int) -> int:
    """A JobWatch's bucket as the operator computes it: crc32("namespace/name") % B."""
    return zlib.crc32(f"{benchenv.NAMESPACE}/{name}".encode()) % buckets


def watch_name(index: int) -> str:
    """The name of the index-th JobWatch (bench/scale.py, `jobwatch`)."""
    return f"w{index:05d}"


def job_of(index: int) -> str:
    """The job id that watch w<index> polls (bench/scale.py, `jobwatch`)."""
    return f"j{index}"


def settled(held: Mapping[str, Iterable[int]], buckets: int) -> bool:
    """Every bucket 0..B-1 held by exactly one replica."""
    every = [b for owned in held.values() for b in owned]
    return len(every) == buckets and set(every) == set(range(buckets))


def jobs_of_buckets(n: int, buckets: int, chosen: Iterable[int]) -> list[str]:
    wanted = set(chosen)
    return [job_of(i) for i in range(n) if bucket_of(watch_name(i), buckets) in wanted]


def duplicates(
    requests: Mapping[str, Sequence[float]], start: float, end: float, interval: float
) -> int:
    """Gaps (whose later request falls in [start, end)) shorter than 0.9 x interval."""
    floor = DUPLICATE_SHARE * interval
    return sum(1 for g in st.gaps(requests, start, end) if g < floor)


def in_flight_twice(
    spans: Mapping[str, Sequence[tuple[float, float | None]]],
    start: float,
    end: float,
    now: float,
) -> dict[str, Any]:
    """Jobs with two requests in flight at once, the later one arriving in [start, end).

    `spans`: per job, [arrival, end] of each request (bench/jobapi.py /stats/spans); a
    request is in flight from its arrival until its end, its answer written or its client
    gone; an end of None is still in flight at `now`. The overlap of a request is how
    long it was in flight together with the earlier one that was out the longest.
    """
    overlap: dict[str, float] = {}
    for job, requests in spans.items():
        out_until = -math.inf  # the latest end of the job's requests so far
        for arrival, finish in sorted((a, now if e is None else e) for a, e in requests):
            if start <= arrival < end and out_until > arrival:
                together = min(out_until, finish) - arrival
                overlap[job] = max(overlap.get(job, 0.0), together)
            out_until = max(out_until, finish)
    worst = sorted(overlap.items(), key=lambda kv: -kv[1])
    return {
        "jobs": len(overlap),
        "max_overlap_s": st.rounded(worst[0][1]) if worst else 0.0,
        "examples": {job: st.rounded(s) for job, s in worst[:5]},
    }


def takeover(
    requests: Mapping[str, Sequence[float]],
    jobs: Sequence[str],
    *,
    at: float,
    survivors_from: float,
    until: float,
    interval: float,
) -> dict[str, Any]:
    """How the survivors took `jobs` over from a replica stopped at `at` (wall clock).

    A request at `survivors_from` or later is a survivor's; per job: the time from `at`
    to its first such request, and the gap from its last request before `at` to it.
    Duplicates: gaps of these jobs shorter than 0.9 x interval whose later request falls
    in [at - interval, until), so a survivor polling while the stopped replica still
    did is counted. Requests in [at, survivors_from): sent by the stopping replica
    (or a survivor early): counted apart.
    """
    repolled: list[float] = []
    gaps: list[float] = []
    missing: list[str] = []
    between = 0
    for job in jobs:
        times = requests.get(job, ())
        before = [t for t in times if t < at]
        later = [t for t in times if survivors_from <= t < until]
        between += sum(1 for t in times if at <= t < survivors_from)
        if not later:
            missing.append(job)
            continue
        repolled.append(later[0] - at)
        if before:
            gaps.append(later[0] - before[-1])
    subset = {job: requests.get(job, ()) for job in jobs}
    return {
        "jobs": len(jobs),
        "repolled": len(repolled),
        "not_repolled": len(missing),
        "not_repolled_examples": missing[:5],
        "all_repolled_s": st.rounded(max(repolled)) if repolled and not missing else None,
        "repolled_p50_s": st.rounded(st.percentile(repolled, 0.5)),
        "longest_gap_s": st.rounded(max(gaps, default=None)),
        "gap_p50_s": st.rounded(st.percentile(gaps, 0.5)),
        "requests_while_stopping": between,
        "duplicates": duplicates(subset, at - interval, until, interval),
    }


def writes_by_resource(
    after: Mapping[str, float], before: Mapping[str, float], seconds: float
) -> dict[str, float]:
    """Per second, "VERB resource[/sub] CODE" from benchstats.apiserver_counters' keys."""
    found: dict[str, float] = {}
    for key in sorted({*after, *before}):
        if key.startswith("write "):
            delta = after.get(key, 0.0) - before.get(key, 0.0)
            if delta:
                found[key[6:]] = round(delta / seconds, 3)
    return found


_REQUEST = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LONGRUNNING = re.compile(r"^apiserver_longrunning_requests\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_SIZES = re.compile(r"^apiserver_response_sizes_sum\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
READ_RESOURCES = ("leases", "jobwatches")


def apiserver_reads(text: str) -> dict[str, float]:
    """Reads of leases and jobwatches ("read VERB resource": LIST, GET, WATCH requests
    started), the watches open now ("open WATCH resource") and the bytes of the LIST and
    GET answers ("bytes VERB resource": apiserver_response_sizes_sum), from /metrics."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            match, prefix = _REQUEST.match(line), "read"
        elif line.startswith("apiserver_longrunning_requests{"):
            match, prefix = _LONGRUNNING.match(line), "open"
        elif line.startswith("apiserver_response_sizes_sum{"):
            match, prefix = _SIZES.match(line), "bytes"
        else:
            continue
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        verb, resource = labels.get("verb", ""), labels.get("resource", "")
        if resource not in READ_RESOURCES or verb not in ("LIST", "GET", "WATCH"):
            continue
        if prefix == "open" and verb != "WATCH":
            continue
        key = f"{prefix} {verb} {resource}"
        found[key] = found.get(key, 0.0) + float(match["value"])
    return found


def events_by_reason(
    items: Iterable[Mapping[str, Any]], start: float, end: float
) -> dict[str, int]:
    """Events last seen in [start, end), by "reason (component)": what the replicas said.

    An Event's own times (lastTimestamp, else eventTime) are the API server's or the
    writer's clock, on the same machine here.
    """
    found: dict[str, int] = {}
    for item in items:
        stamp = item.get("lastTimestamp") or item.get("eventTime")
        if not stamp:
            continue
        at = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        if not start <= at < end:
            continue
        source = item.get("reportingComponent") or (item.get("source") or {}).get("component")
        key = f"{item.get('reason')} ({source or '?'})"
        found[key] = found.get(key, 0) + 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def parse_stamp(text: str) -> float:
    """An RFC 3339 time of the API's (…Z) as epoch seconds."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def status_age(item: Mapping[str, Any], now: float) -> float | None:
    """How old the poll a JobWatch's status tells of is at `now`: now - lastPollTime;
    None while it has no lastPollTime."""
    stamp = (item.get("status") or {}).get("lastPollTime")
    return now - parse_stamp(str(stamp)) if stamp else None


def age_summary(ages: Sequence[float], missing: int, interval: float) -> dict[str, Any]:
    """The distribution of status ages (`status_age`), also in intervals: at best a
    status is up to one interval old (the next poll is due then)."""

    def share_over(bound: float) -> float | None:
        return round(sum(1 for a in ages if a > bound) / len(ages), 4) if ages else None

    p50, p99 = st.percentile(ages, 0.5), st.percentile(ages, 0.99)
    top = max(ages, default=None)
    return {
        "watches": len(ages) + missing,
        "without_last_poll_time": missing,
        "p50_s": st.rounded(p50),
        "p90_s": st.rounded(st.percentile(ages, 0.9)),
        "p99_s": st.rounded(p99),
        "max_s": st.rounded(top),
        "p50_intervals": None if p50 is None else round(p50 / interval, 2),
        "p99_intervals": None if p99 is None else round(p99 / interval, 2),
        "max_intervals": None if top is None else round(top / interval, 2),
        "older_than_1_interval_share": share_over(interval),
        "older_than_2_intervals_share": share_over(2 * interval),
    }


def longest_gap(
    requests: Mapping[str, Sequence[float]], start: float, until: float
) -> dict[str, Any]:
    """The longest time any job went unpolled within [start, until): gaps whose later
    request falls in the span, and gaps still open at `until` (a job left unpolled)."""
    worst, job_of_worst, open_jobs = 0.0, None, 0
    for job, times in requests.items():
        before = [t for t in times if t < until]
        if not before:
            continue
        candidates = [b - a for a, b in itertools.pairwise(before) if b >= start]
        if until - before[-1] > worst:
            candidates.append(until - before[-1])
        for gap in candidates:
            if gap > worst:
                worst, job_of_worst = gap, job
        open_jobs += 1 if before[-1] < start else 0
    return {
        "max_s": st.rounded(worst) if job_of_worst else None,
        "job": job_of_worst,
        "jobs_not_polled_in_span": open_jobs,
    }


def exhaustion(
    samples: Sequence[Mapping[str, Any]], total_gib: float, guard_gib: float, since: float
) -> dict[str, Any]:
    """What ran short first, from the monitor's samples (wall, available_gib, cpu_busy,
    rss_mib): memory (available under the guard or a tenth of the machine), or CPU
    (every core at least 95 % busy for a minute or more). Times from `since`."""
    floor = max(guard_gib, total_gib / 10)
    memory_at = next((s["wall"] for s in samples if s["available_gib"] < floor), None)
    cpu_at, streak_from = None, None
    for sample in samples:
        if sample["cpu_busy"] < SATURATED_BUSY:
            streak_from = None
            continue
        streak_from = sample["wall"] - MONITOR_S if streak_from is None else streak_from
        if sample["wall"] - streak_from >= SATURATED_S:
            cpu_at = streak_from
            break
    short = {k: v for k, v in (("memory", memory_at), ("cpu", cpu_at)) if v is not None}
    peaks: dict[str, float] = {}
    for sample in samples:
        for name, rss in sample["rss_mib"].items():
            peaks[name] = max(peaks.get(name, 0.0), rss)
    busy = [s["cpu_busy"] for s in samples]
    return {
        "first": min(short, key=lambda k: short[k]) if short else None,
        "memory_short_after_s": None if memory_at is None else round(memory_at - since, 1),
        "cpu_saturated_after_s": None if cpu_at is None else round(cpu_at - since, 1),
        "min_available_gib": min((s["available_gib"] for s in samples), default=None),
        "memory_floor_gib": round(floor, 2),
        "cpu_busy_p50": st.percentile(busy, 0.5),
        "cpu_busy_max": max(busy, default=None),
        "peak_rss_mib": dict(sorted(peaks.items(), key=lambda kv: -kv[1])[:12]),
    }


# --- processes ----------------------------------------------------------------------


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


# --- waiting on state -----------------------------------------------------------------


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


# --- one run -----------------------------------------------------------------------------


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
        f"in flight twice {_twice(found['in_flight_twice'])}"
    )
    return found


async def failover(stage: Stage) -> dict[str, Any]:
    opts = stage.opts
    found: dict[str, Any] = {}
    if opts.slow:
        found["join"] = await join(stage)
    first, second, *rest = stage.live()
    found["kill"] = await stop_replica(stage, first, "kill", [second, *rest])
    log(_takeover_line(found["kill"]))
    settle = await wait_settled(stage, opts.settle_limit)
    found["settled_after_kill"] = settle
    log(f"after the kill: settled {settle['settled']} ({settle['after_s']}s)")
    if not rest:
        found["sigterm"] = "skipped: no replica would be left to take over (2 replicas)"
    elif not settle["settled"]:
        found["sigterm"] = "skipped: the survivors did not settle after the kill"
    else:
        found["sigterm"] = await stop_replica(stage, second, "sigterm", rest)
        log(_takeover_line(found["sigterm"]))
    return found


def _takeover_line(f: dict[str, Any]) -> str:
    return (
        f"  {f['how']} {f['replica']}: {f['repolled']}/{f['jobs']} repolled, all after "
        f"{f['all_repolled_s']}s, longest gap {f['longest_gap_s']}s, duplicates "
        f"{f['duplicates']} (fleet {f['duplicates_whole_fleet']}), in flight twice "
        f"{_twice(f['in_flight_twice'])}"
    )


def _twice(found: Mapping[str, Any]) -> str:
    return f"{found['jobs']} jobs (longest overlap {found['max_overlap_s']}s)"


# --- start-up, staleness, rollout --------------------------------------------------------


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


def _staleness_line(found: Mapping[str, Any]) -> str:
    return (
        f" status age (now - lastPollTime): p50 {found['p50_s']}s p99 {found['p99_s']}s "
        f"max {found['max_s']}s ({found['p50_intervals']} / {found['p99_intervals']} / "
        f"{found['max_intervals']} intervals); no lastPollTime {found['without_last_poll_time']}"
    )


def _rollout_line(found: Mapping[str, Any]) -> str:
    req, size = found["apiserver_requests"], found["apiserver_bytes"]
    return (
        f"  rollout: {found['duration_s']}s, completed {found['completed']}; jobwatches LIST "
        f"{req.get('LIST jobwatches', 0):.0f} ({size.get('LIST jobwatches', 0) / MiB:.1f} MiB),"
        f" GET {req.get('GET jobwatches', 0):.0f} ({size.get('GET jobwatches', 0) / MiB:.1f} "
        f"MiB); duplicates {found['duplicates']}; in flight twice "
        f"{_twice(found['in_flight_twice'])}; longest gap {found['longest_gap']['max_s']}s"
    )


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
    log(_window_line(run))
    if opts.staleness_samples:
        run["staleness"] = await staleness(stage)
        log(" " + _staleness_line(run["staleness"]["all"]))
    if not largest:
        return
    if opts.rollout:
        run["rollout"] = await rollout(stage)
        log(_rollout_line(run["rollout"]))
    if len(stage.live()) < 2:
        return
    if run["settle"]["settled"]:
        run["failover"] = await failover(stage)
    else:
        run["failover"] = "skipped: the buckets never settled"


def _window_line(result: dict[str, Any]) -> str:
    w = result["window"]
    per = ", ".join(
        f"{k[-2:]} {r['polls_per_s']}/s {r['cpu_ms_per_poll']} ms/poll {r['buckets_held']}b"
        for k, r in w["per_replica"].items()
    )
    return (
        f"  window: {w['job_service_polls_per_s']}/s at the job service; {per}; apiserver "
        f"{w['apiserver_cores']} cores; duplicates {w['gaps']['duplicates']}; in flight twice "
        f"{_twice(w['in_flight_twice'])}"
    )


# --- the whole benchmark --------------------------------------------------------------


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


def header(
    opts: Options,
    argv: Sequence[str],
    started: datetime.datetime,
    plan: dict[str, Any],
    cluster: controlplane.Cluster,
) -> dict[str, Any]:
    """The result's head: the command, code, host, options and the operator's settings."""
    return {
        "kind": "replicas",
        "started": started.isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *argv],
        "git": resultfiles.git_state(),
        "host": resultfiles.host_facts(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "operator_env": {
            **{k: v for k, v in os.environ.items() if k.startswith("JOBWATCH_")},
            **plan["operator_env"],
            **lease_env(opts, "<fresh per run>"),
            "JOBWATCH_IDENTITY": "<group>-r<k>",
            "JOBWATCH_NAMESPACES": benchenv.NAMESPACE,
        },
        "apiserver_visible": "apiserver" in cluster.pids,
        "runs": [],
    }


async def bench(opts: Options, children: procs.Children, argv: Sequence[str]) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.time()
    sopts = scale_options(opts)
    cluster = await controlplane.control_plane(sopts)
    kube = Kube(load_kubeconfig(cluster.kubeconfig))
    plan = fleet.load_plan(sopts, opts.watches, opts.interval)
    result = header(opts, argv, started, plan, cluster)
    if "apiserver" not in cluster.pids:
        log("the API server does not run on this machine: its CPU is not measured")
    monitor = Monitor(opts.min_available_gib, dict(cluster.pids))
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.create_task(monitor.run(task))
    try:
        await fleet_runs(
            opts,
            kube=kube,
            cluster=cluster,
            children=children,
            plan=plan,
            monitor=monitor,
            result=result,
        )
    except (benchenv.BenchError, TimeoutError, KubeError, aiohttp.ClientError) as exc:
        result["failed"] = repr(exc)[:2000]
        log(f"the run stopped early: {result['failed']}")
    except asyncio.CancelledError:
        if monitor.ran_out is None:
            raise
        task.uncancel()  # the monitor's own cancel: report, as for any other shortage
        result["failed"] = monitor.ran_out
    finally:
        watcher.cancel()
        result["limits"] = exhaustion(
            monitor.samples, psutil.virtual_memory().total / GiB, opts.min_available_gib, t0
        )
        result["monitor_samples"] = monitor.samples
        try:
            async with asyncio.timeout(600):
                await kube.request("DELETE", benchenv.JW_PATH, ok=(200, 404))
        except (TimeoutError, KubeError, aiohttp.ClientError) as exc:
            # The figures are kept; the next run empties the namespace anyway.
            log(f"deleting the JobWatches failed: {exc!r}")
        finally:
            await kube.aclose()
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return result


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


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _run_lines(run: Mapping[str, Any]) -> list[str]:
    """One run's lines of the table: per replica, then the run's figures."""
    lines: list[str] = []
    if "start_up" in run:
        lines.append(_start_up_line(run))
    if "window" not in run:
        lines.append(f"    run of {run['replicas']} replica(s) cut short")
        return lines
    w = run["window"]
    for name, r in w["per_replica"].items():
        lines.append(
            f"{run['replicas']:>3} {name:<18} {_f(r['polls_per_s']):>8} "
            f"{_f(r['planned_polls_per_s']):>7} {_f(r['cpu_ms_per_poll'], 4):>11} "
            f"{_f(r['cores'], 3):>6} {_f(r['rss_mib']):>8} {r['buckets_held']:>7}"
        )
    g = w["gaps"]
    writes = w["apiserver_writes_per_s"]
    lines.append(
        f"    job service {w['job_service_polls_per_s']}/s (plan {w['planned_polls_per_s']}),"
        f" {g['jobs_polled']} jobs; gaps p50 {g['p50_s']} p99 {g['p99_s']} max {g['max_s']} s,"
        f" duplicates (< {g['duplicate_below_s']}s) {g['duplicates']}"
    )
    lines.append(
        f"    control plane (window): apiserver {_f(w['apiserver_cores'], 3)} cores RSS "
        f"{_f(w['rss_mib']['apiserver'])} MiB; etcd {_f(w['etcd_cores'], 3)} cores RSS "
        f"{_f(w['rss_mib']['etcd'])} MiB; read bytes/s {w['read_bytes_per_s']}"
    )
    if "staleness" in run:
        lines.append("    after the window:" + _staleness_line(run["staleness"]["all"]))
    if "rollout" in run:
        lines.append("  " + _rollout_line(run["rollout"]))
    lines.append(
        f"    apiserver {_f(w['apiserver_cores'], 3)} cores; writes/s: leases PUT "
        f"{_sum(writes, 'PUT leases')}, POST {_sum(writes, 'POST leases')}; "
        f"jobwatches/status PATCH {_sum(writes, 'PATCH jobwatches/status')}; events POST "
        f"{_sum(writes, 'POST events')}; reads/s {w['apiserver_reads_per_s']}"
    )
    lines.append(
        f"    two requests of one job in flight at once: while settling "
        f"{_twice(run['settle']['in_flight_twice'])}; steady {_twice(w['in_flight_twice'])}"
    )
    top = list(w.get("events_by_reason", {}).items())[:4]
    lines.append(f"    Events in the window by reason: {dict(top) or 'none'}")
    lines.append(
        f"    settled {run['settle']['settled']} after {run['settle']['after_s']}s "
        f"(lease mode {run['settle']['lease_mode']}); queues empty after "
        f"{run['queues_empty_after_s']}s; window from "
        f"{run['window_start_after_start_s']}s after the start; operator code "
        f"{run['operator_code']['operator_sha256']}"
    )
    lines += _failover_lines(run.get("failover"))
    return lines


def _failover_lines(fo: Any) -> list[str]:
    lines: list[str] = []
    if isinstance(fo, dict):
        if "join" in fo:
            j = fo["join"]
            lines.append(
                f"    join     {j['replica']}: settled {j['settled']} after "
                f"{j['settled_after_s']}s, in flight twice {_twice(j['in_flight_twice'])}"
            )
        for key in ("kill", "sigterm"):
            f = fo[key]
            if isinstance(f, dict):
                lines.append(
                    f"    {f['how']:<8} {f['replica']}: {f['jobs']} jobs, all repolled after"
                    f" {f['all_repolled_s']}s (exit {f['exited_after_s']}s), longest gap "
                    f"{f['longest_gap_s']}s, duplicates {f['duplicates']} "
                    f"(whole fleet {f['duplicates_whole_fleet']}), not repolled "
                    f"{f['not_repolled']}, in flight twice {_twice(f['in_flight_twice'])}"
                )
            else:
                lines.append(f"    {key}: {f}")
    elif fo:
        lines.append(f"    failover: {fo}")
    return lines


def table(result: dict[str, Any]) -> str:
    opts = result["options"]
    base = result.get("baseline", {})
    lines = [
        f"replicas benchmark: {opts['watches']} watches, interval {opts['interval']:g}s, "
        f"{opts['buckets']} buckets, window {opts['window']:g}s, {result['started']}"
        + (
            f"; {opts['slow']} jobs answer in {opts['slow_seconds']:g}s" if opts.get("slow") else ""
        ),
        f"baseline (no replica): apiserver {_f(base.get('apiserver_cores'), 3)} cores,"
        f" writes/s {base.get('apiserver_writes_per_s')}; created the fleet in "
        f"{_f(result.get('create_s'))} s",
        "",
        f"{'run':>3} {'replica':<18} {'polls/s':>8} {'plan/s':>7} {'CPU ms/poll':>11} "
        f"{'cores':>6} {'RSS MiB':>8} {'buckets':>7}",
    ]
    for run in result["runs"]:
        lines += _run_lines(run)
    limits = result.get("limits", {})
    lines.append(
        f"machine: ran short first: {limits.get('first') or 'nothing'} (memory after "
        f"{_f(limits.get('memory_short_after_s'))} s, CPU saturated after "
        f"{_f(limits.get('cpu_saturated_after_s'))} s); min available "
        f"{limits.get('min_available_gib')} GiB; CPU busy p50 {limits.get('cpu_busy_p50')}"
    )
    if result.get("failed"):
        lines.append(f"run stopped early: {result['failed']}")
    return "\n".join(lines)


def _start_up_line(run: Mapping[str, Any]) -> str:
    first, settle = run["start_up"], run.get("settle", {})
    return (
        f"{run['replicas']:>3} start-up: every job polled once after "
        f"{first['all_polled_after_s']}s ({first['jobs_polled']} jobs; first poll after "
        f"{first['first_poll_after_s']}s); buckets settled after {settle.get('after_s')}s"
    )


def _sum(writes: Mapping[str, float], prefix: str) -> str:
    """All codes of one verb and resource, per second."""
    total = sum(v for k, v in writes.items() if k.rsplit(" ", 1)[0] == prefix)
    return f"{total:.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, one run each")
    parser.add_argument("--watches", type=int, default=3000, help="JobWatches (3000)")
    parser.add_argument("--interval", type=float, default=5.0, help="spec.interval, s (5)")
    parser.add_argument("--window", type=float, default=60.0, help="steady window, s (60)")
    parser.add_argument("--buckets", type=int, default=32, help="JOBWATCH_BUCKETS (32)")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--renew-deadline", type=float, default=10.0)
    parser.add_argument("--retry-period", type=float, default=2.0)
    parser.add_argument("--hosts", type=int, default=4, help="job API ports (4)")
    parser.add_argument("--settle-limit", type=float, default=180.0, help="s (180)")
    parser.add_argument(
        "--slow",
        type=int,
        default=0,
        metavar="N",
        help="the jobs of watches w00000 ... w(N-1) answer in --slow-seconds (0: none)",
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=10.0, help="the slow jobs' answer time, s (10)"
    )
    parser.add_argument(
        "--rollout",
        action="store_true",
        help="in the largest run, replace each replica in turn (maxSurge 1) before the kill",
    )
    parser.add_argument(
        "--staleness-samples",
        type=int,
        default=3,
        metavar="N",
        help="LISTs of every status over one interval after the window (3; 0: none)",
    )
    parser.add_argument(
        "--min-available-gib",
        type=float,
        default=2.0,
        help="stop the run and report when the machine has less memory available (2)",
    )
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster (admin) instead")
    parser.add_argument("--results-dir", type=Path, default=benchenv.RESULTS)
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every replica (repeatable)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = benchenv.parse_operator_env(parser, args.operator_env)
    try:
        counts = tuple(int(s) for s in args.replicas.split(",") if s.strip())
    except ValueError:
        parser.error("--replicas: comma-separated counts, e.g. 1,2,3")
    if not counts or min(counts) < 1 or args.watches < 1 or args.buckets < 1:
        parser.error("--replicas, --watches and --buckets must be positive")
    if args.watches > 100_000 or args.staleness_samples < 0:
        # Names are w00000 ... w99999 (bench/scale.py): a sixth digit breaks their order.
        parser.error("--watches at most 100000; --staleness-samples not negative")
    if not 0 <= args.slow <= args.watches or args.slow_seconds <= 0:
        parser.error("--slow must be within 0..--watches and --slow-seconds positive")
    return Options(
        replicas=counts,
        watches=args.watches,
        interval=args.interval,
        window=args.window,
        buckets=args.buckets,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        hosts=args.hosts,
        kubeconfig=args.kubeconfig,
        results_dir=args.results_dir,
        settle_limit=args.settle_limit,
        operator_env=extra,
        slow=args.slow,
        slow_seconds=args.slow_seconds,
        rollout=args.rollout,
        staleness_samples=args.staleness_samples,
        min_available_gib=args.min_available_gib,
    )


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    # controlplane.control_plane and stop_control_plane start and stop the cluster there.
    controlplane.BENCH_CLUSTER = CLUSTER_DIR
    started = time.monotonic()
    result = runner.run_harness(
        "replicas",
        lambda children: bench(opts, children, argv),
        own_cluster=opts.kubeconfig is None,
    )
    if isinstance(result, int):
        return result
    path = resultfiles.save_results(result, opts.results_dir, "replicas")
    print(table(result))
    print(f"\nresults: {path}  ({time.monotonic() - started:.0f}s)")
    if not any(r.get("window", {}).get("job_service_polls_per_s") for r in result["runs"]):
        log("no poll was measured")
        return 1
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
