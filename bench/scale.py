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

Results: _out/bench/results/scale-<timestamp>.json and latest.json, the plot
_out/bench/results/scale.png, and a table on stdout. Logs: _out/bench/. Everything the
harness starts (control plane included, unless --kubeconfig names one) is stopped at
the end, also on Ctrl-C, SIGTERM or an error. Only loopback is used.

Exit status: 0 when the harness did its job, whatever the figures; 1 when it broke
(the operator died, no poll happened, no results were written...).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import benchstats as st
import jobapi
from benchenv import LOGS, RESULTS, log, parse_operator_env
from controlplane import control_plane, ensure_namespace, install, operator_kubeconfig
from fleet import Options
from kubeclient import Kube, load_kubeconfig
from procs import Children
from resultfiles import git_state, host_facts
from runner import run_harness
from scale_figures import overload_verdict
from scale_report import table, write_results
from scale_run import Context, measure_size


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


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
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
        # A smoke run is a harness check: its results stay apart, with the logs.
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
