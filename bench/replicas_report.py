"""The replicas benchmark's table on stdout, from its results.

Part of bench/replicas.py (no jobwatch layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchenv import MiB


def takeover_line(f: dict[str, Any]) -> str:
    return (
        f"  {f['how']} {f['replica']}: {f['repolled']}/{f['jobs']} repolled, all after "
        f"{f['all_repolled_s']}s, longest gap {f['longest_gap_s']}s, duplicates "
        f"{f['duplicates']} (fleet {f['duplicates_whole_fleet']}), in flight twice "
        f"{twice(f['in_flight_twice'])}"
    )


def twice(found: Mapping[str, Any]) -> str:
    return f"{found['jobs']} jobs (longest overlap {found['max_overlap_s']}s)"


def staleness_line(found: Mapping[str, Any]) -> str:
    return (
        f" status age (now - lastPollTime): p50 {found['p50_s']}s p99 {found['p99_s']}s "
        f"max {found['max_s']}s ({found['p50_intervals']} / {found['p99_intervals']} / "
        f"{found['max_intervals']} intervals); no lastPollTime {found['without_last_poll_time']}"
    )


def rollout_line(found: Mapping[str, Any]) -> str:
    req, size = found["apiserver_requests"], found["apiserver_bytes"]
    return (
        f"  rollout: {found['duration_s']}s, completed {found['completed']}; jobwatches LIST "
        f"{req.get('LIST jobwatches', 0):.0f} ({size.get('LIST jobwatches', 0) / MiB:.1f} MiB),"
        f" GET {req.get('GET jobwatches', 0):.0f} ({size.get('GET jobwatches', 0) / MiB:.1f} "
        f"MiB); duplicates {found['duplicates']}; in flight twice "
        f"{twice(found['in_flight_twice'])}; longest gap {found['longest_gap']['max_s']}s"
    )


def window_line(result: dict[str, Any]) -> str:
    w = result["window"]
    per = ", ".join(
        f"{k[-2:]} {r['polls_per_s']}/s {r['cpu_ms_per_poll']} ms/poll {r['buckets_held']}b"
        for k, r in w["per_replica"].items()
    )
    return (
        f"  window: {w['job_service_polls_per_s']}/s at the job service; {per}; apiserver "
        f"{w['apiserver_cores']} cores; duplicates {w['gaps']['duplicates']}; in flight twice "
        f"{twice(w['in_flight_twice'])}"
    )


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
        lines.append("    after the window:" + staleness_line(run["staleness"]["all"]))
    if "rollout" in run:
        lines.append("  " + rollout_line(run["rollout"]))
    lines.append(
        f"    apiserver {_f(w['apiserver_cores'], 3)} cores; writes/s: leases PUT "
        f"{_sum(writes, 'PUT leases')}, POST {_sum(writes, 'POST leases')}; "
        f"jobwatches/status PATCH {_sum(writes, 'PATCH jobwatches/status')}; events POST "
        f"{_sum(writes, 'POST events')}; reads/s {w['apiserver_reads_per_s']}"
    )
    lines.append(
        f"    two requests of one job in flight at once: while settling "
        f"{twice(run['settle']['in_flight_twice'])}; steady {twice(w['in_flight_twice'])}"
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
                f"{j['settled_after_s']}s, in flight twice {twice(j['in_flight_twice'])}"
            )
        for key in ("kill", "sigterm"):
            f = fo[key]
            if isinstance(f, dict):
                lines.append(
                    f"    {f['how']:<8} {f['replica']}: {f['jobs']} jobs, all repolled after"
                    f" {f['all_repolled_s']}s (exit {f['exited_after_s']}s), longest gap "
                    f"{f['longest_gap_s']}s, duplicates {f['duplicates']} "
                    f"(whole fleet {f['duplicates_whole_fleet']}), not repolled "
                    f"{f['not_repolled']}, in flight twice {twice(f['in_flight_twice'])}"
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
