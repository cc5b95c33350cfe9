"""The replicas benchmark's arithmetic: buckets, duplicate polls, requests in flight twice,
takeovers, the API server's reads and writes, status ages, what the machine ran short of.

Part of bench/replicas.py (no jobwatch layer): pure functions over what a run recorded.
"""

from __future__ import annotations

import datetime
import itertools
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import benchenv
import benchstats as st
from benchenv import MiB

# Two requests of one job closer than this share of the interval: a duplicate poll
# (the pending interval is planned within +-10 %, API.md).
DUPLICATE_SHARE = 0.9
GiB = 1024 * MiB
MONITOR_S = 5.0  # how often the machine's memory and CPU are sampled
# The machine is short of CPU once all its cores are this busy for SATURATED_S or more.
SATURATED_BUSY = 0.95
SATURATED_S = 60.0


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
