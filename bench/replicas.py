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
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil

import benchenv
import controlplane
import fleet
import procs
import resultfiles
import runner
from benchenv import log
from kubeclient import Kube, KubeError, load_kubeconfig
from replicas_figures import GiB, exhaustion
from replicas_report import table
from replicas_run import CLUSTER_DIR, Monitor, Options, fleet_runs, lease_env, scale_options


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
