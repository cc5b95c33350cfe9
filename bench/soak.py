"""Soak benchmark: 1,000 JobWatches for 30 minutes of churn, in one operator process.

    .venv/bin/python bench/soak.py                  # 1,000 watches, 30 minutes (make soak)
    .venv/bin/python bench/soak.py --smoke          # 100 watches, 2 minutes: does it work
    .venv/bin/python bench/soak.py --watches 500 --minutes 10
    .venv/bin/python bench/soak.py --kubeconfig .cache/cluster/admin.kubeconfig ...

Does the operator stay healthy over a long run in which the fleet keeps changing? The
harness (the pieces of bench/scale.py: control plane, CRD and RBAC, the operator's
ServiceAccount token, child processes) runs:

- a job service inside this process (bench/jobapi.py's server and seeded jobs) that
  records every request per job with its time and what it answered, and can make a
  job's endpoint fail for a while: 503s, or no answer at all (the request times out);
- N JobWatches (intervals of 2 s and 5 s, `requestTimeout` 2 s, backoff capped at
  10 s) created before the operator starts;
- churn for the whole run, each kind at --churn x N per minute: creates and deletes
  (the count stays near N), spec edits (the other interval), suspends (resumed 10-30 s
  later), endpoint faults (10-30 s, then the endpoint recovers); jobs also complete;
- a sample every 10 s: the operator's RSS (psutil) and its gauges from /metrics.

Verdicts (figures on stdout, everything in the results file):
- RSS growth after warm-up (the first quarter of the run, at least 60 s): < 5 %;
- asyncio tasks and scheduler heap entries do not grow (jobwatch_asyncio_tasks,
  jobwatch_scheduler_entries: entries of cancelled plans must go);
- every watch polls on time or has ended, from the job service's own records: no gap
  over interval x 1.1 + 250 ms (after an error: the capped backoff, after a timeout:
  plus the request timeout), none under 0.9 x interval, no request after a delete, a
  suspend or the job's end (allowing 1 s for the change to reach the operator), and
  every created, edited or resumed watch polled within 1 s + one interval.

Results: _out/bench/results/soak-<time>.json (a --smoke run: _out/bench/). Exit status 0
when the harness did its job, whatever the figures; 1 when it broke.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

import benchenv
import benchstats as st
import controlplane
import jobapi
import jobhttp
import loopback
import procs
import resultfiles
import runner
import sampling
from fleet import Options as FleetOptions
from kubeclient import Kube, KubeError, load_kubeconfig

INTERVALS = (2.0, 5.0)
REQUEST_TIMEOUT = 2.0
MAX_BACKOFF = 10.0
SPREAD = 0.1  # the pending interval's spread (API.md): ±10 %
SLACK = 0.25  # what the machine may add to a gap
REACH = 1.0  # a change made through the API server reaches the operator within this
SAMPLE_EVERY = 10.0
TARGET_RSS_GROWTH = 0.05
# The scheduler rebuilds its heap when stale entries outnumber live ones plus this many
# (operator/jobwatch/control/scheduler.py, COMPACT_SLACK): the bound on its heap is
# 2 x watches + it.
HEAP_SLACK = 1024
GAUGES = {
    "watches": "jobwatch_watches",
    "queued": "jobwatch_polls_queued",
    "scheduler_entries": "jobwatch_scheduler_entries",
    "asyncio_tasks": "jobwatch_asyncio_tasks",
}
MiB = 1024 * 1024

# What the job service answered one request
OK, DONE, UNAVAILABLE, HELD = range(4)
OUTCOMES = ("ok", "done", "503", "held")


@dataclass(frozen=True)
class Options:
    watches: int
    minutes: float
    smoke: bool
    churn: float  # of each kind of change, per minute, as a fraction of --watches
    kubeconfig: Path | None
    results_dir: Path
    seed: int
    mean_polls: float
    pending_fraction: float


# --- the job service --------------------------------------------------------------


class Ledger(jobapi.Jobs):
    """jobapi's seeded jobs, plus every request per job (time, outcome), plus faults."""

    def __init__(self, seed: int, mean_polls: float, pending_fraction: float) -> None:
        super().__init__(seed, mean_polls, pending_fraction)
        self.times: dict[str, array[float]] = {}
        self.outcomes: dict[str, bytearray] = {}
        self.faults: dict[str, tuple[int, float]] = {}  # job -> (outcome, until)
        self.requests = 0

    def poll_answer(self, job_id: str) -> tuple[int, bytes] | None:
        now = time.monotonic()
        fault = self.faults.get(job_id)
        if fault is not None and now < fault[1]:
            outcome, body = fault[0], b'{"error": "unavailable"}'
        else:
            # A fault's requests do not count as the job's polls: its fate stays seeded.
            body = self.poll(job_id)
            outcome = DONE if b'"COMPLETED"' in body else OK
        self.times.setdefault(job_id, array("d")).append(now)
        self.outcomes.setdefault(job_id, bytearray()).append(outcome)
        self.requests += 1
        if outcome == HELD:
            return None
        return (503, body) if outcome == UNAVAILABLE else (200, body)

    def job_ended(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.completed_at is not None


# --- the fleet ----------------------------------------------------------------------


@dataclass
class Tracked:
    """One JobWatch as the harness made it, with its changes: (monotonic time, change,
    interval). A change that starts polls (create, edit, resume) is timed when its request
    was sent, one that stops them (delete, suspend) when the API server had accepted it:
    the operator may act on a change before the harness hears back."""

    name: str
    job: str
    interval: float
    changes: list[tuple[float, str, float]] = field(default_factory=list)
    suspended: bool = False
    deleted: bool = False


def body(name: str, job: str, port: int, interval: float, timeout: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{benchenv.GROUP}/{benchenv.VERSION}",
        "kind": "JobWatch",
        "metadata": {"name": name},
        "spec": {
            "url": f"http://127.0.0.1:{port}{jobapi.PREFIX}{job}{jobapi.SUFFIX}",
            "interval": benchenv.go_duration(interval),
            "timeout": timeout,
            "requestTimeout": benchenv.go_duration(REQUEST_TIMEOUT),
            "backoff": {"maxInterval": benchenv.go_duration(MAX_BACKOFF)},
            "successWhen": 'response.body.status == "COMPLETED"',
        },
    }


class Fleet:
    def __init__(self, kube: Kube, ledger: Ledger, port: int, opts: Options) -> None:
        self._kube, self._ledger, self._port = kube, ledger, port
        self._rng = random.Random(opts.seed)
        # Long enough that no watch times out during the run.
        self._timeout = benchenv.go_duration(max(3600.0, opts.minutes * 120))
        self.watches: dict[str, Tracked] = {}
        self._next = 0
        self.counts = {"create": 0, "delete": 0, "edit": 0, "suspend": 0, "resume": 0}
        self.faults = {"503": 0, "held": 0}
        self.api_errors = 0
        self._suspends: set[asyncio.Task[None]] = set()

    def live(self) -> list[Tracked]:
        return [w for w in self.watches.values() if not w.deleted]

    async def _call(self, method: str, path: str, payload: Any = None) -> bool:
        for attempt in range(5):
            try:
                if method == "PATCH":
                    await self._kube.patch(path, payload)
                else:
                    await self._kube.request(method, path, body=payload, ok=(200, 201, 202))
                return True
            except KubeError as exc:
                if exc.status not in (429, 500, 503, 504):
                    break
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2 * 2**attempt)
        self.api_errors += 1
        return False

    async def create(self) -> None:
        self._next += 1
        name, job = f"s{self._next:06d}", f"soak{self._next}"
        interval = self._rng.choice(INTERVALS)
        payload = body(name, job, self._port, interval, self._timeout)
        sent = time.monotonic()
        if await self._call("POST", benchenv.JW_PATH, payload):
            watch = Tracked(name, job, interval)
            watch.changes.append((sent, "create", interval))
            self.watches[name] = watch
            self.counts["create"] += 1

    async def delete(self, watch: Tracked) -> None:
        if await self._call("DELETE", f"{benchenv.JW_PATH}/{watch.name}"):
            watch.changes.append((time.monotonic(), "delete", watch.interval))
            self.counts["delete"] += 1

    async def edit(self, watch: Tracked) -> None:
        interval = next(i for i in INTERVALS if i != watch.interval)
        patch = {"spec": {"interval": benchenv.go_duration(interval)}}
        sent = time.monotonic()
        if await self._call("PATCH", f"{benchenv.JW_PATH}/{watch.name}", patch):
            watch.interval = interval
            watch.changes.append((sent, "edit", interval))
            self.counts["edit"] += 1

    async def suspend(self, watch: Tracked, seconds: float) -> None:
        watch.suspended = True
        if not await self._call(
            "PATCH", f"{benchenv.JW_PATH}/{watch.name}", {"spec": {"suspend": True}}
        ):
            watch.suspended = False
            return
        watch.changes.append((time.monotonic(), "suspend", watch.interval))
        self.counts["suspend"] += 1
        await asyncio.sleep(seconds)
        if watch.deleted:
            return
        sent = time.monotonic()
        if await self._call(
            "PATCH", f"{benchenv.JW_PATH}/{watch.name}", {"spec": {"suspend": False}}
        ):
            watch.changes.append((sent, "resume", watch.interval))
            self.counts["resume"] += 1
        watch.suspended = False

    def fault(self, watch: Tracked, seconds: float) -> None:
        outcome = self._rng.choice((UNAVAILABLE, HELD))
        self._ledger.faults[watch.job] = (outcome, time.monotonic() + seconds)
        self.faults[OUTCOMES[outcome]] += 1

    async def churn(self, per_minute: float, target: int, stop: asyncio.Event) -> None:
        """Once a second, each kind of change at `per_minute` on average, each to a
        different watch; creates keep the count near `target`."""
        rng = self._rng
        chance = per_minute / 60
        while not stop.is_set():
            tick = time.monotonic()
            changes = []
            chosen: set[str] = set()
            for kind in ("delete", "edit", "suspend", "fault"):
                for _ in range(int(chance) + (rng.random() < chance % 1)):
                    candidates = [
                        w
                        for w in self.live()
                        if w.name not in chosen
                        and not w.suspended
                        and (kind == "delete" or not self._ledger.job_ended(w.job))
                    ]
                    if not candidates:
                        break
                    watch = rng.choice(candidates)
                    chosen.add(watch.name)
                    if kind == "delete":
                        watch.deleted = True  # out of live() at once
                        changes.append(self.delete(watch))
                    elif kind == "edit":
                        changes.append(self.edit(watch))
                    elif kind == "suspend":
                        watch.suspended = True
                        task = asyncio.create_task(self.suspend(watch, rng.uniform(10, 30)))
                        self._suspends.add(task)
                        task.add_done_callback(self._suspends.discard)
                    else:
                        self.fault(watch, rng.uniform(10, 30))
            missing = max(0, target - len(self.live()))
            changes.extend(self.create() for _ in range(min(missing, int(chance) + 2)))
            await asyncio.gather(*changes)
            try:
                async with asyncio.timeout(max(0.0, tick + 1 - time.monotonic())):
                    await stop.wait()
            except TimeoutError:
                pass
        # Resumes still to come are after the judged window: not waited for.
        for task in self._suspends:
            task.cancel()
        await asyncio.gather(*self._suspends, return_exceptions=True)


# --- the verdict on polling ------------------------------------------------------------


@dataclass
class Timing:
    """What the job service's records say about each watch's polling."""

    checked: int = 0  # watches
    requests: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    worst: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def flag(
        self, kind: str, watch: Tracked, at: float, by: float, since: float, **context: Any
    ) -> None:
        self.violations[kind] = self.violations.get(kind, 0) + 1
        worst = self.worst.setdefault(kind, [])
        changes = [(round(t - since, 2), c) for t, c, _ in watch.changes if at - 60 < t <= at]
        worst.append(
            {
                "watch": watch.name,
                "at_s": round(at - since, 2),
                "by_s": round(by, 3),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in context.items()},
                "changes": changes,
            }
        )
        worst.sort(key=lambda v: -v["by_s"])
        del worst[5:]


def backoff_bound(interval: float, errors: int) -> float:
    return min(MAX_BACKOFF, interval * 2.0**errors) * (1 + SPREAD) + SLACK


def _events(watch: Tracked, ledger: Ledger) -> list[tuple[float, int, str, float]]:
    """The watch's changes and its job's requests, in time order: (time, 1 for a change
    and 0 for a request, the change or the request's outcome, the change's interval)."""
    times = ledger.times.get(watch.job, array("d"))
    outcomes = ledger.outcomes.get(watch.job, bytearray())
    events: list[tuple[float, int, str, float]] = [
        (t, 1, change, interval) for t, change, interval in watch.changes
    ]
    events += [(t, 0, OUTCOMES[o], 0.0) for t, o in zip(times, outcomes, strict=True)]
    events.sort()
    return events


def _judge_watch(
    timing: Timing,
    watch: Tracked,
    events: list[tuple[float, int, str, float]],
    since: float,
    until: float,
) -> None:
    """`judge` for one watch."""
    timing.checked += 1
    interval = next((i for _, c, i in watch.changes if c == "create"), watch.interval)
    deadline: float | None = None
    stopped_at: float | None = None  # deleted, suspended or ended
    last: float | None = None
    previous = ""  # what the last request got
    errors = 0
    gap_interval = interval
    for at, is_change, what, value in events:
        if at > until:
            break
        if is_change:
            if what in ("create", "edit", "resume"):
                gap_interval = min(interval, value)
                interval = value
                deadline = at + REACH + interval * (1 + SPREAD) + SLACK
                stopped_at = None
                if what != "resume":
                    errors = 0
            else:  # delete, suspend
                deadline, stopped_at = None, at
            continue
        timing.requests += 1
        if at < since:
            last, previous = at, what
            deadline = at + interval * (1 + SPREAD) + SLACK
            if what == "done":  # ended during the warm-up: nothing more is due
                deadline, stopped_at = None, at
            continue
        if stopped_at is not None and at > stopped_at + REACH:
            timing.flag("polled_after_stop", watch, at, at - stopped_at, since)
        if deadline is not None and at > deadline:
            timing.flag("late", watch, at, at - deadline, since)
        if last is not None and at - last < gap_interval * (1 - SPREAD) - 0.02:
            shortest = gap_interval * (1 - SPREAD)
            timing.flag(
                "early", watch, at, shortest - (at - last), since, gap=at - last, after=previous
            )
        last, gap_interval, previous = at, interval, what
        if stopped_at is not None:
            continue  # one too many, flagged above: it plans nothing
        if what == "done":
            deadline, stopped_at = None, at
        elif what == "ok":
            errors = 0
            deadline = at + interval * (1 + SPREAD) + SLACK
        else:
            errors += 1
            held = REQUEST_TIMEOUT if what == "held" else 0.0
            deadline = at + held + backoff_bound(interval, errors)
    if deadline is not None and deadline < until:
        timing.flag("overdue_at_end", watch, until, until - deadline, since)


def judge(fleet: Fleet, ledger: Ledger, since: float, until: float) -> Timing:
    """Walks each watch's requests and changes in time order, from `since` (every watch of
    the initial fleet had been polled once) to `until` (the end of the churn).

    `deadline` is when the next request must have come: after a pending answer one interval
    (+10 %), after the k-th error in a row the capped backoff, after a held request also
    the request timeout; after a create, edit or resume `REACH` plus one interval. A delete,
    a suspend and the job's end take it away: a request after one of them (plus REACH) is
    one too many.
    """
    timing = Timing()
    for watch in fleet.watches.values():
        _judge_watch(timing, watch, _events(watch, ledger), since, until)
    return timing


# --- samples and figures ------------------------------------------------------------------


@dataclass
class Sampler:
    http: aiohttp.ClientSession
    metrics_url: str
    process: psutil.Process
    ledger: Ledger
    fleet: Fleet
    started: float
    points: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        last_requests, last_at = self.ledger.requests, time.monotonic()
        while not stop.is_set():
            try:
                async with asyncio.timeout(SAMPLE_EVERY):
                    await stop.wait()
            except TimeoutError:
                pass
            now = time.monotonic()
            try:
                rss = self.process.memory_info().rss / MiB
            except psutil.Error:
                return
            metrics = await sampling.scrape(self.http, self.metrics_url) or {}
            point: dict[str, Any] = {
                "t": round(now - self.started, 1),
                "rss_mib": round(rss, 1),
                "polls_per_s": round((self.ledger.requests - last_requests) / (now - last_at), 1),
                "objects": len(self.fleet.live()),
                "suspended": sum(1 for w in self.fleet.live() if w.suspended),
                "faulty": sum(1 for _, until in self.ledger.faults.values() if until > now),
            }
            for key, name in GAUGES.items():
                point[key] = st.value(metrics, name) if _has(metrics, name) else None
            point["status_backlog"] = sum(
                st.by_label(metrics, "jobwatch_status_backlog", "kind").values()
            )
            self.points.append(point)
            last_requests, last_at = self.ledger.requests, now
            benchenv.log(
                f"  t={point['t']:.0f}s rss {rss:.1f} MiB, {point['polls_per_s']:.0f} polls/s, "
                f"{point['objects']} objects, watches {point['watches']}, "
                f"entries {point['scheduler_entries']}, tasks {point['asyncio_tasks']}"
            )


def _has(samples: st.Samples, name: str) -> bool:
    return any(sample == name for sample, _ in samples)


def trend(points: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any]:
    """After warm-up: first and last value (means of three samples), growth, the maximum
    of the first and of the last third, and the least-squares slope per hour."""
    series = [(p["t"], p[key]) for p in points if p["t"] >= warmup and p[key] is not None]
    if len(series) < 2:
        return {"samples": len(series)}
    values = [v for _, v in series]
    head, tail = values[:3], values[-3:]
    first, last = sum(head) / len(head), sum(tail) / len(tail)
    third = max(1, len(values) // 3)
    fit = st.linear_fit(series)
    return {
        "samples": len(series),
        "first": round(first, 2),
        "last": round(last, 2),
        "growth": round((last - first) / first, 4) if first else None,
        "max_first_third": max(values[:third]),
        "max_last_third": max(values[-third:]),
        "max": max(values),
        "per_hour": round(fit[0] * 3600, 2) if fit else None,
    }


def verdicts(
    points: list[dict[str, Any]], timing: Timing, warmup: float
) -> tuple[dict[str, Any], list[str]]:
    rss = trend(points, "rss_mib", warmup)
    tasks = trend(points, "asyncio_tasks", warmup)
    entries = trend(points, "scheduler_entries", warmup)
    missing = [
        GAUGES[k]
        for k in ("asyncio_tasks", "scheduler_entries")
        if "max" not in trend(points, k, 0)
    ]
    peak_watches = max((p["watches"] or 0 for p in points), default=0)
    found: dict[str, Any] = {
        "rss": {**rss, "target_growth": TARGET_RSS_GROWTH},
        "asyncio_tasks": tasks,
        "scheduler_entries": {**entries, "bound": 2 * peak_watches + HEAP_SLACK},
        "timing": {
            "watches": timing.checked,
            "requests": timing.requests,
            "violations": timing.violations,
            "worst": timing.worst,
        },
        "missing_gauges": missing,
    }
    met: dict[str, bool | None] = {
        "rss_growth_under_5pct": None
        if rss.get("growth") is None
        else rss["growth"] < TARGET_RSS_GROWTH,
        "tasks_do_not_grow": None
        if "max" not in tasks
        else tasks["max_last_third"] <= tasks["max_first_third"] * 1.1 + 20,
        "heap_entries_bounded": None
        if "max" not in entries
        else entries["max"] <= 2 * peak_watches + HEAP_SLACK
        and entries["max_last_third"] <= entries["max_first_third"] * 1.2 + HEAP_SLACK,
        "every_watch_on_time_or_ended": not timing.violations,
    }
    found["met"] = met
    failed = [name for name, ok in met.items() if ok is False]
    return found, failed


# --- the run ---------------------------------------------------------------------------------


async def create_initial(fleet: Fleet, n: int, concurrency: int = 32) -> None:
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            queue.pop()
            await fleet.create()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def wait_first_polls(fleet: Fleet, ledger: Ledger, operator: Any, limit: float) -> float:
    """Until every watch of the initial fleet was polled once; when that was (monotonic)."""
    deadline = time.monotonic() + limit
    jobs = [w.job for w in fleet.watches.values()]
    while time.monotonic() < deadline:
        if operator.poll() is not None:
            raise benchenv.BenchError(f"the operator exited with {operator.returncode}")
        if all(job in ledger.times for job in jobs):
            return time.monotonic()
        await asyncio.sleep(0.25)
    polled = sum(1 for job in jobs if job in ledger.times)
    raise benchenv.BenchError(f"only {polled} of {len(jobs)} watches polled within {limit:.0f}s")


async def churn(
    opts: Options,
    fleet: Fleet,
    ledger: Ledger,
    operator: subprocess.Popen[bytes],
    *,
    log_path: Path,
    metrics_port: int,
    window: tuple[float, float],
) -> tuple[Sampler, float]:
    """The churn, sampled, for --minutes from `window`'s second time (every watch polled
    once; the first: the operator's start); the sampler, and when the churn stopped."""
    op_started, since = window
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        sampler = Sampler(
            http,
            f"http://127.0.0.1:{metrics_port}/metrics",
            psutil.Process(operator.pid),
            ledger,
            fleet,
            op_started,
        )
        tasks = [
            asyncio.create_task(sampler.run(stop)),
            asyncio.create_task(fleet.churn(opts.churn * opts.watches, opts.watches, stop)),
        ]
        end = since + opts.minutes * 60
        while (left := end - time.monotonic()) > 0:
            if operator.poll() is not None:
                stop.set()
                raise benchenv.BenchError(
                    f"the operator exited with {operator.returncode}:\n{procs.tail(log_path)}"
                )
            await asyncio.sleep(min(1.0, left))
        until = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks)
    return sampler, until


def operator_env(sa_kubeconfig: Path, metrics_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "KUBECONFIG": str(sa_kubeconfig),
        "JOBWATCH_NAMESPACES": benchenv.NAMESPACE,
        "JOBWATCH_HEALTH_PORT": str(loopback.free_port()),
        "JOBWATCH_METRICS_PORT": str(metrics_port),
    }


def report(
    opts: Options,
    fleet: Fleet,
    ledger: Ledger,
    sampler: Sampler,
    *,
    started: datetime.datetime,
    git: dict[str, Any],
    env: dict[str, str],
    log_path: Path,
    shutdown: dict[str, Any],
    verdict: tuple[float, dict[str, Any], list[str]],
) -> dict[str, Any]:
    """The results file's content; `verdict`: the warm-up left out, the figures and the
    targets they failed (`verdicts`)."""
    warmup, found, failed = verdict
    return {
        "kind": "soak",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git,
        "host": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "operator_env": {k: v for k, v in env.items() if k.startswith("JOBWATCH_")},
        "warmup_s": round(warmup, 1),
        "changes": fleet.counts,
        "faults": fleet.faults,
        "api_errors": fleet.api_errors,
        "requests_by_outcome": {
            name: sum(o.count(code) for o in ledger.outcomes.values())
            for code, name in enumerate(OUTCOMES)
        },
        "jobs_completed": ledger.completed,
        "shutdown": shutdown,
        "operator_log": resultfiles.log_summary(log_path),
        **found,
        "failed": failed,
        "series": sampler.points,
    }


async def prepare(opts: Options, cluster: controlplane.Cluster, kube: Kube, fleet: Fleet) -> Fleet:
    """The CRD and RBAC installed, the namespace empty, the initial fleet created."""
    await controlplane.install(cluster)
    await controlplane.ensure_namespace(kube)
    await controlplane.empty_namespace(kube)
    benchenv.log(f"creating {opts.watches} JobWatches")
    await create_initial(fleet, opts.watches)
    return fleet


async def soak(opts: Options, children: procs.Children) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC)
    cluster = await controlplane.control_plane(_scale_options(opts))
    kube = Kube(load_kubeconfig(cluster.kubeconfig))
    ledger = Ledger(opts.seed, opts.mean_polls, opts.pending_fraction)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: jobhttp.HttpProtocol(ledger), "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    operator = None
    try:
        fleet = await prepare(opts, cluster, kube, Fleet(kube, ledger, port, opts))
        with tempfile.TemporaryDirectory(prefix="jobwatch-soak-") as tmp:
            sa_kubeconfig = Path(tmp) / "operator.kubeconfig"
            await controlplane.operator_kubeconfig(cluster, sa_kubeconfig)
            metrics_port = loopback.free_port()
            env = operator_env(sa_kubeconfig, metrics_port)
            log_path = benchenv.LOGS / "operator-soak.log"
            log_path.unlink(missing_ok=True)
            git = resultfiles.git_state()
            operator = children.start([benchenv.PYTHON, "-m", "jobwatch"], log_path, env)
            op_started = time.monotonic()
            benchenv.log(f"operator started (pid {operator.pid})")
            since = await wait_first_polls(fleet, ledger, operator, 60 + opts.watches / 50)
            benchenv.log(
                f"all polled {since - op_started:.1f}s after the start; "
                f"churn for {opts.minutes:g} min"
            )
            sampler, until = await churn(
                opts,
                fleet,
                ledger,
                operator,
                log_path=log_path,
                metrics_port=metrics_port,
                window=(op_started, since),
            )
            shutdown_s, killed = await children.stop(operator, grace=30)
    finally:
        if operator is not None:
            await children.stop(operator, grace=30)
        server.close()
        try:
            async with asyncio.timeout(300):  # not waited for: the next run empties it
                await kube.request("DELETE", benchenv.JW_PATH, ok=(200, 404))
        finally:
            await kube.aclose()
    timing = judge(fleet, ledger, since, until - REACH)
    warmup = (since - op_started) + max(60.0, opts.minutes * 60 / 4)
    found, failed = verdicts(sampler.points, timing, warmup)
    return report(
        opts,
        fleet,
        ledger,
        sampler,
        started=started,
        git=git,
        env=env,
        log_path=log_path,
        shutdown={"seconds": round(shutdown_s, 2), "killed": killed},
        verdict=(warmup, found, failed),
    )


def _scale_options(opts: Options) -> FleetOptions:
    """bench/scale.py's options, for its control-plane helper (it reads the kubeconfig)."""
    return FleetOptions(
        mode="soak",
        sizes=(opts.watches,),
        interval=INTERVALS[0],
        duration=opts.minutes * 60,
        kubeconfig=opts.kubeconfig,
        results_dir=opts.results_dir,
        seed=opts.seed,
        mean_polls=opts.mean_polls,
        pending_fraction=opts.pending_fraction,
        create_concurrency=32,
        http_seconds=0.0,
        sample_every=SAMPLE_EVERY,
        profile=False,
    )


def figures(result: dict[str, Any]) -> str:
    rss, tasks, entries = result["rss"], result["asyncio_tasks"], result["scheduler_entries"]
    timing = result["timing"]
    lines = [
        f"soak: {result['options']['watches']} watches, {result['options']['minutes']:g} min, "
        f"warm-up {result['warmup_s']:.0f}s",
        f"changes: {result['changes']}, faults: {result['faults']}, "
        f"API errors: {result['api_errors']}",
        f"requests: {result['requests_by_outcome']}, jobs completed: {result['jobs_completed']}",
        f"RSS: {rss.get('first')} -> {rss.get('last')} MiB after warm-up, growth "
        f"{_pct(rss.get('growth'))} (target < {TARGET_RSS_GROWTH:.0%}), "
        f"slope {rss.get('per_hour')} MiB/h",
        f"asyncio tasks: max {tasks.get('max_first_third')} (first third) -> "
        f"{tasks.get('max_last_third')} (last third), slope {tasks.get('per_hour')}/h",
        f"scheduler entries: max {entries.get('max_first_third')} (first third) -> "
        f"{entries.get('max_last_third')} (last third), max {entries.get('max')}, "
        f"bound {entries['bound']}",
        f"polling: {timing['watches']} watches, {timing['requests']} requests, "
        f"violations {timing['violations'] or 'none'}",
    ]
    for kind, worst in timing["worst"].items():
        lines.append(f"  worst {kind}: {worst}")
    if result["missing_gauges"]:
        lines.append(f"missing gauges (not judged): {', '.join(result['missing_gauges'])}")
    lines.append(f"verdicts: {result['met']}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="100 watches for 2 minutes")
    parser.add_argument("--watches", type=int, default=None, help="fleet size (1000)")
    parser.add_argument("--minutes", type=float, default=None, help="length of the churn (30)")
    parser.add_argument(
        "--churn",
        type=float,
        default=0.02,
        help="changes of each kind per minute, as a fraction of --watches (0.02)",
    )
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster (admin) instead")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mean-polls", type=float, default=None, help="of a job that completes (400; smoke: 20)"
    )
    parser.add_argument("--pending-fraction", type=float, default=0.7)
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)
    churn = args.churn if not smoke else max(args.churn, 0.1)  # enough of each in 2 min
    return Options(
        watches=args.watches or (100 if smoke else 1000),
        minutes=args.minutes or (2.0 if smoke else 30.0),
        smoke=smoke,
        churn=churn,
        kubeconfig=args.kubeconfig,
        results_dir=args.results_dir or (benchenv.LOGS if smoke else benchenv.RESULTS),
        seed=args.seed,
        mean_polls=args.mean_polls or (20.0 if smoke else 400.0),
        pending_fraction=args.pending_fraction,
    )


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    result = runner.run_harness(
        "soak", lambda children: soak(opts, children), own_cluster=opts.kubeconfig is None
    )
    if isinstance(result, int):
        return result
    path = resultfiles.save_results(result, opts.results_dir, "soak")
    print(figures(result))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
