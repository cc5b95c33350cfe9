"""The scale benchmark's report: the table on stdout, the plots, the results files.

Part of bench/scale.py (no jobwatch layer).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fleet import Options
from resultfiles import save_results
from scale_figures import HTTP_ERROR_REASONS, TARGET_LAG_P99, TARGET_RSS_MIB, fmt, verdicts


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _run_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's settings and its start-up."""
    startup, window, spans, load = r["startup"], r["window"], r["spans"], r["load"]
    all_polled = (
        fmt(startup["all_polled_s"], 2)
        if startup["all_polled_s"] is not None
        else f"{startup['polled']} in {startup['limit_s']:g}s"
    )
    all_status = (
        fmt(startup["all_status_s"], 1)
        if startup["all_status_s"] is not None
        else f"{r['n'] - startup['with_status_at_window_end']} without"
    )

    git = r.get("git") or {}
    commit = git.get("commit", "?")[:7] + ("+changes" if git.get("operator_changes") else "")
    env = load["operator_env"]
    return [
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
            f"{load['max_in_flight']} / {fmt(load['in_flight_littles_law'])}",
        ),
        (
            "polls/s planned / achieved [window]",
            f"{r['planned_polls_per_s']:g} / {window['polls_per_s']:g}",
        ),
        ("polls/s planned, active [window]", fmt(window["planned_active_polls_per_s"])),
        (
            "create N JobWatches, s (/s)",
            f"{r['create']['seconds']:.1f} ({r['create']['per_s']:.0f})",
        ),
        ("[start-up] first poll, s", fmt(startup["first_poll_s"], 2)),
        ("[start-up] all polled once, s", all_polled),
        (
            "[start-up] all have a status, s (budget)",
            f"{all_status} ({startup['all_status_budget_s']:g})",
        ),
        ("[start-up] span, s", fmt(spans["startup"]["seconds"], 1)),
        ("window steady (all polled before)?", "yes" if r["steady"] else "NO"),
        (
            "watches known at window start / end",
            f"{r['watches_known']['window_start']:.0f} / {r['watches_known']['window_end']:.0f}",
        ),
        (
            "RSS peak [whole run] / window end, MiB",
            f"{fmt(r['rss']['peak_mib'])} / {fmt(r['rss']['window_end_mib'])}"
            + ("" if r["rss"]["complete"] else " (>=)"),
        ),
    ]


def _span_rows(name: str, sp: dict[str, Any]) -> list[tuple[str, str]]:
    lag, gaps, det, w = sp["lag"], sp["gaps"], sp["detection"], sp["writes"]
    from_answer = sp["gaps_from_answer"]
    return [
        (
            f"[{name}] CPU ms/poll; cores",
            f"{fmt(sp['operator_ms_per_poll'], 3)}; {fmt(sp['operator_cores'], 2)}",
        ),
        (
            f"[{name}] lag p50 / p99 / max<=, ms",
            f"{fmt(lag['p50_ms'])} / {fmt(lag['p99_ms'])} / {fmt(lag['max_le_ms'])}",
        ),
        (
            f"[{name}] lag <= 50 / <= 250 ms",
            f"{_share(lag['within_50ms'])} / {_share(lag['within_250ms'])}",
        ),
        (
            f"[{name}] gaps mean / p1 / p50 / p99 / max, s",
            f"{fmt(gaps['mean_s'], 2)} / {fmt(gaps['p1_s'], 2)} / "
            f"{fmt(gaps['p50_s'], 2)} / {fmt(gaps['p99_s'], 2)} / {fmt(gaps['max_s'], 2)}",
        ),
        (
            f"[{name}] polls held by host limits; s waited",
            f"{sp['host_limit_delays']['polls']}; {sp['host_limit_delays']['seconds']:g}",
        ),
        (
            f"[{name}] gaps > {gaps['late_after_s']:g} s",
            f"{gaps['late']} ({_share(gaps['late_share'])})",
        ),
        (
            f"[{name}] from answer p50 / p99 / max, s",
            " / ".join(fmt(from_answer[k], 2) for k in ("p50_s", "p99_s", "max_s")),
        ),
        (f"[{name}] gaps after a hung request", str(from_answer["after_unanswered_request"])),
        (
            f"[{name}] detection p50 / p99 / max, s",
            f"{fmt(det['p50_s'], 2)} / {fmt(det['p99_s'], 2)} / {fmt(det['max_s'], 2)}",
        ),
        (f"[{name}] detection seen / ended", f"{det['detected']} / {det['completed']}"),
        (
            f"[{name}] status PATCH/s; per poll",
            f"{fmt(w['status_patches_per_s'], 2)}; {fmt(w['status_patches_per_poll'], 4)}",
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


def _whole_run_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    window, cpu = r["window"], r["cpu"]
    writes, http = r["status_writes"], r["http_client_cpu"]
    return [
        ("status writes per finished watch", fmt(writes["per_finished_watch_lifetime"], 2)),
        (
            "watches without status, window end",
            str(writes["phases_at_window_end"].get("(no status)", 0)),
        ),
        ("polls queued, max sampled", fmt(r["queued_max"], 0)),
        (
            "answers delayed / hung [window]",
            f"{window['answers_delayed']} / {window['requests_hung']}",
        ),
        (
            "raw aiohttp / HttpClient ms/req",
            f"{http['raw']['cpu_ms_per_request']:.3f}"
            f" / {http['jobwatch']['cpu_ms_per_request']:.3f}",
        ),
        ("HttpClient / raw aiohttp", f"{fmt(http['ratio'], 2)}x"),
        (
            "job API CPU ms/req; cores",
            f"{cpu['jobapi_ms_per_request']:.3f}; {cpu['jobapi_cores']:.2f}",
        ),
        (
            "kube-apiserver / etcd, cores",
            f"{fmt(cpu['apiserver_cores'], 2)} / {fmt(cpu['etcd_cores'], 2)}",
        ),
        (
            "host busy cores (others)",
            f"{cpu['host_busy_cores']:.2f} ({cpu['other_processes_cores']:.2f})",
        ),
        ("polls after COMPLETED (must be 0)", str(window["polls_after_completion"])),
        (
            "operator shutdown, s (budget)",
            f"{r['operator_shutdown']['seconds']:.1f} ({fmt(r['operator_shutdown']['budget_s'])})",
        ),
        (
            "operator log warnings / errors",
            f"{r['operator_log']['by_level'].get('WARNING', 0)}"
            f" / {r['operator_log']['by_level'].get('ERROR', 0)}",
        ),
    ]


def figures(r: dict[str, Any]) -> list[tuple[str, str]]:
    """One run's figures as (label, text) rows, for the table on stdout. Every row that
    is not a whole-run figure names its span: [start-up], [window] or [whole run]."""
    rows = _run_rows(r)
    labels = (("startup", "start-up"), ("window", "window"), ("whole_run", "whole run"))
    for key, name in labels:
        rows += _span_rows(name, r["spans"][key])
    return rows + _whole_run_rows(r)


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
            f"{fmt(over['queued_max'], 0)}; client errors {over['http_client_errors']:g}"
        )
        for name, ok in over["criteria"].items():
            lines.append(f"  {'met' if ok else 'MISSED':<7} {name}")
        lines.append("  t(s)  polls/s  lag p50 ms  lag p99 ms  queued max")
        for p in result["runs"][0]["series"]:
            lines.append(
                f"  {p['t']:>5.0f}  {p['polls_per_s']:>7.0f}  {fmt(p['lag_p50_ms']):>10}  "
                f"{fmt(p['lag_p99_ms']):>10}  {fmt(p['queued_max'], 0):>10}"
            )
    return "\n".join(lines)


def _save(fig: Any, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    _save(
        fig,
        f"jobwatch scale benchmark, interval {interval:g}s, {result['started'][:16]}, {commit}",
        path,
    )


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
    _save(
        fig,
        f"jobwatch overload: N={r['n']}, interval {r['interval_s']:g}s, {result['started'][:16]}",
        path,
    )


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
