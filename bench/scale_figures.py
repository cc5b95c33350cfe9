"""The scale benchmark's figures: per span and per run, and its targets and verdicts.

Part of bench/scale.py (no jobwatch layer): arithmetic over what a run sampled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import psutil

import benchstats as st
from benchenv import LOGS, BenchError
from fleet import FleetWatch
from resultfiles import log_summary

if TYPE_CHECKING:
    from scale_run import Run, Snapshot


LAG = "jobwatch_poll_lag_seconds"
HTTP_ERROR_REASONS = ("TransientError", "HTTPError", "InvalidResponse")
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
# The operator's defaults, for the figures that depend on them (app/config.py).
DEFAULT_STATUS_QPS, DEFAULT_STATUS_BURST = 18.0, 50


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def to_ms(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    if math.isinf(seconds):
        return "inf"
    return round(seconds * 1000, 1)


def lag_summary(h: st.Buckets) -> dict[str, Any]:
    p50, p99 = st.quantile(h, 0.5), st.quantile(h, 0.99)
    return {
        "count": int(st.total(h)),
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "max_le_ms": to_ms(st.max_bound(h)),
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


def _gaps(
    interval: float, requests: dict[str, list[float]], since: float, until: float
) -> dict[str, Any]:
    gaps = st.gaps(requests, since, until)
    gap_summary = st.gap_summary(gaps, interval * (1 + GAP_SPREAD) + TARGET_LAG_MAX)
    p99_bound = interval * (1 + GAP_SPREAD) + TARGET_LAG_P99
    gap_summary["within_p99_bound"] = (
        round(sum(1 for g in gaps if g <= p99_bound) / len(gaps), 6) if gaps else None
    )
    gap_summary["p99_bound_s"] = round(p99_bound, 3)
    return gap_summary


def _host_limit_delays(a: Snapshot, b: Snapshot) -> dict[str, Any]:
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
        "polls": int(sum(held_back.values())),
        "by_host": held_back,
        "seconds": round(waited, 2),
    }


def _writes(api: dict[str, float], a: Snapshot, b: Snapshot, polls: float) -> dict[str, Any]:
    seconds = b.wall - a.wall
    patches = api["status_patches"]
    dropped = st.value(b.metrics, "jobwatch_events_dropped_total") - st.value(
        a.metrics, "jobwatch_events_dropped_total"
    )
    return {
        "status_patches": patches,
        "status_patch_failures": api["status_patch_failures"],
        "status_patches_per_s": round(patches / seconds, 2) if seconds > 0 else None,
        "status_patches_per_poll": round(patches / polls, 4) if polls else None,
        "events_created": api["events_created"],
        "event_failures": api["event_failures"],
        "events_dropped": dropped,
        "all_writes_by_verb": {k[6:]: v for k, v in api.items() if k.startswith("write ") and v},
        "operator_status_writes": st.diff(
            st.by_label(b.metrics, "jobwatch_status_writes_total", "result"),
            st.by_label(a.metrics, "jobwatch_status_writes_total", "result"),
        ),
        "operator_events_created": st.value(b.metrics, "jobwatch_events_created_total")
        - st.value(a.metrics, "jobwatch_events_created_total"),
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
    reasons = st.diff(
        st.by_label(b.metrics, "jobwatch_polls_total", "reason"),
        st.by_label(a.metrics, "jobwatch_polls_total", "reason"),
    )
    late_after = run.interval * (1 + GAP_SPREAD) + TARGET_LAG_MAX
    from_answer, unanswered = st.answer_gaps(requests, delays, a.wall, b.wall)
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
        "gaps": _gaps(run.interval, requests, a.wall, b.wall),
        # ... and from the answer to the next request: the same when answers are instant.
        "gaps_from_answer": {
            **st.gap_summary(from_answer, late_after),
            "after_unanswered_request": unanswered,
        },
        "detection": detection_summary(ends, fleet, seen_by, grace),
        # Polls the per-host limits held back (jobwatch_host_polls_delayed_total), by
        # host, and how long they waited in all: none while a limit never binds.
        "host_limit_delays": _host_limit_delays(a, b),
        # As the API server counted them; the operator's own counters beside, to cross-check.
        "writes": _writes(api, a, b, polls),
        "apiserver_429": api["429"],
        "apiserver_rejected_apf": api["rejected_apf"],
        "polls_by_reason": reasons,
        "http_errors": {r: reasons.get(r, 0.0) for r in HTTP_ERROR_REASONS},
    }


def _job_ends(
    n: int, per_job: dict[str, list[Any]], start_wall: float, end_wall: float, grace: float
) -> tuple[dict[str, list[tuple[int, float]]], list[float]]:
    """Jobs whose real end fell in a span (start-up, window), early enough to be seen by
    the window's end if detection met its target twice over (`grace`); the end is the job
    API's wall-clock time. And for the window's jobs, the job's end to the first request
    after it (whose answer, COMPLETED, may have been delayed or never sent with
    --latency): the wait for the next poll."""
    ends: dict[str, list[tuple[int, float]]] = {"startup": [], "window": []}
    next_request: list[float] = []
    for i in range(n):
        job = per_job.get(f"j{i}")
        ended = job[3] if job else None
        if ended is None or ended >= end_wall - grace:
            continue
        ends["window" if ended >= start_wall else "startup"].append((i, ended))
        if ended >= start_wall and job is not None and job[2] is not None:
            next_request.append(job[2] - ended)
    return ends, next_request


def _startup_statuses(
    run: Run, fleet: FleetWatch, startup: dict[str, Any], start: Snapshot, end: Snapshot
) -> dict[str, Any]:
    """`startup` (the start-up's figures so far) with when the watches had a status."""
    n = run.n
    with_status = [t for t in fleet.status_at if t is not None and t <= end.wall]
    status_qps = float(run.plan["operator_env"].get("JOBWATCH_STATUS_QPS", DEFAULT_STATUS_QPS))
    status_burst = int(run.plan["operator_env"].get("JOBWATCH_STATUS_BURST", DEFAULT_STATUS_BURST))
    return {
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


def _window(run: Run, start: Snapshot, end: Snapshot, polls: float) -> dict[str, Any]:
    n, interval = run.n, run.interval
    window = end.wall - start.wall
    return {
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
    }


def _rss(run: Run, start: Snapshot, end: Snapshot) -> dict[str, Any]:
    op_rss = [mib for _, mib in run.rss]
    adopted = st.value(end.metrics, "jobwatch_watches")
    in_window = [mib for t, mib in run.rss if start.wall - run.started_wall <= t]
    return {
        "peak_mib": max(op_rss, default=None),
        "window_end_mib": in_window[-1] if in_window else None,
        "window_mean_mib": round(sum(in_window) / len(in_window), 1) if in_window else None,
        # With fewer watches adopted than created, the figures understate RSS at N.
        "complete": adopted >= run.n,
        "series": run.rss,
    }


def _cpu(start: Snapshot, end: Snapshot, polls: float) -> dict[str, Any]:
    window = end.wall - start.wall

    def cores(name: str) -> float | None:
        x, y = start.cpu.get(name), end.cpu.get(name)
        return None if x is None or y is None else round((y - x) / window, 3)

    op_cpu_s = (end.cpu["operator"] or 0.0) - (start.cpu["operator"] or 0.0)
    jobapi_cpu = end.server["cpu_s"] - start.server["cpu_s"]
    host_busy = (end.host[0] - start.host[0]) / window
    measured = ("operator", "jobapi", "apiserver", "etcd", "kcm", "harness")
    known = sum(c for name in measured if (c := cores(name)) is not None)
    return {
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
    }


def _status_writes(
    fleet: FleetWatch, n: int, end: Snapshot, writes: dict[str, Any]
) -> dict[str, Any]:
    finished = [i for i in range(n) if (fleet.succeeded_at[i] or math.inf) <= end.wall]
    lifetime_writes = [fleet.modified[i] for i in finished]
    return {
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
    }


def _spans(
    run: Run,
    fleet: FleetWatch,
    *,
    snapshots: tuple[Snapshot, Snapshot, Snapshot],
    ends: dict[str, list[tuple[int, float]]],
    requests: dict[str, list[float]],
    delays: dict[str, list[float]],
    grace: float,
) -> dict[str, dict[str, Any]]:
    """Each span's figures; `snapshots`: before the operator's start, at the window's
    start and end."""
    before, start, end = snapshots
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

    return {
        "startup": figures_of(at_start, start, ends["startup"]),
        "window": figures_of(start, end, ends["window"]),
        "whole_run": figures_of(at_start, end, ends["startup"] + ends["window"]),
    }


def _percentiles(values: list[float]) -> dict[str, Any]:
    return {
        "p50_s": st.rounded(st.percentile(values, 0.5)),
        "p99_s": st.rounded(st.percentile(values, 0.99)),
        "max_s": st.rounded(max(values, default=None)),
    }


def _watches_known(start: Snapshot, end: Snapshot) -> dict[str, float]:
    return {
        "window_start": st.value(start.metrics, "jobwatch_watches"),
        "window_end": st.value(end.metrics, "jobwatch_watches"),
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
    polls = end.server["polls"] - start.server["polls"]
    if polls <= 0:
        raise BenchError("no poll reached the job API during the steady window")
    grace = 2 * (interval + TARGET_DETECTION_SLACK)
    ends, next_request = _job_ends(n, per_job, start.wall, end.wall, grace)
    spans = _spans(
        run,
        fleet,
        snapshots=(before, start, end),
        ends=ends,
        requests=requests,
        delays=delays,
        grace=grace,
    )
    startup = _startup_statuses(run, fleet, startup, start, end)
    result: dict[str, Any] = {
        "n": n,
        "interval_s": interval,
        "planned_polls_per_s": round(n / interval, 1),
        "load": run.plan,
        "create": {"seconds": round(created_s, 2), "per_s": round(n / created_s, 1)},
        "startup": startup,
        "window": _window(run, start, end, polls),
        "spans": spans,
        # The window's jobs: the wait for the next poll after the end (job API's clock).
        "end_to_next_request": _percentiles(next_request),
        "rss": _rss(run, start, end),
        "cpu": _cpu(start, end, polls),
        "status_writes": _status_writes(fleet, n, end, spans["window"]["writes"]),
        "queued_max": max(
            (p["queued_max"] for p in run.series if p["queued_max"] is not None), default=None
        ),
        "watches_known": _watches_known(start, end),
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


Row = tuple[str, Any, Any, bool | None]  # target, measured, unit, met (None: not measurable)


def _resource_rows(r: dict[str, Any], span: dict[str, Any]) -> list[Row]:
    cpu = span["operator_ms_per_poll"]
    return [
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
    ]


def _timing_rows(r: dict[str, Any], span: dict[str, Any]) -> list[Row]:
    detection_limit = r["interval_s"] + TARGET_DETECTION_SLACK
    lag, det, gaps = span["lag"], span["detection"], span["gaps"]
    return [
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
            f"{gaps['late']} of {gaps['count']}, max {fmt(gaps['max_s'], 3)} s"
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
    ]


def _write_rows(r: dict[str, Any], span: dict[str, Any]) -> list[Row]:
    writes = span["writes"]
    per_poll, per_s = writes["status_patches_per_poll"], writes["status_patches_per_s"]
    whole = r["spans"]["whole_run"]
    return [
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
    ]


def _startup_rows(r: dict[str, Any]) -> list[Row]:
    return [
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


def targets(r: dict[str, Any], span_name: str) -> list[dict[str, Any]]:
    """The issue's targets against one span's figures ("window" or "whole_run"); met is
    None when not measurable. RSS (peak), 429s and the start-up are whole-run figures in
    both lists."""
    span = r["spans"][span_name]
    rows = [
        *_resource_rows(r, span),
        *_timing_rows(r, span),
        *_write_rows(r, span),
        *_startup_rows(r),
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


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"  { ({True: 'met', False: 'MISSED', None: 'n/a'}[t['met']]):<7} {t['target']:<72}"
        f" {fmt(t['measured'], 3)} {t['unit']}"
        for t in rows
    ]
