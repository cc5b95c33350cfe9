"""The scale benchmark's harness still works: `bench/scale.py --smoke` on the test cluster.

Not a performance assertion: only that the harness runs end to end (job API on
several ports with delayed and hung answers, JobWatches, operator, measurements,
HTTP client comparison) and writes results in which every figure was measured:
for the start-up, the window and the whole run, gaps at the job service, detection
from the jobs' real ends, writes as the API server counted them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO, Cluster

# A smoke run takes about 60 s on the 2-core CI machine: 30 s of steady window plus
# set-up, the operator's shutdown flush and two short HTTP client runs.
TIMEOUT = 150


def test_bench_smoke_runs_and_writes_results(installed: Cluster, tmp_path: Path) -> None:
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "scale.py"),
                "--smoke",
                "--latency",
                "lognormal:median=5ms,p99=100ms,hang=1%",
                "--request-timeout",
                "2",
                "--kubeconfig",
                str(installed.kubeconfig),
                "--results-dir",
                str(tmp_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"bench/scale.py --smoke did not finish within {TIMEOUT}s\n{exc.stderr!s}"
        ) from None
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"

    latest = tmp_path / "latest.json"
    assert latest.is_file(), f"no results in {tmp_path}: {sorted(tmp_path.iterdir())}"
    result = json.loads(latest.read_text())
    (run,) = result["runs"]
    assert run["n"] == 200
    assert run["window"]["polls"] > 0, run["window"]
    assert run["startup"]["polled"] == 200, run["startup"]
    # One job service host and the operator's defaults, as a user's first run has them.
    assert run["load"]["hosts"] == 1
    assert run["load"]["operator_env"] == {}, run["load"]
    # The job API delayed its answers and left some unanswered, as asked.
    assert run["window"]["answers_delayed"] > 0, run["window"]
    spans = run["spans"]
    window, whole = spans["window"], spans["whole_run"]
    # 40 polls/s of answers within 100 ms (p99): the host's limit never binds.
    assert window["host_limit_delays"] == {"polls": 0, "by_host": {}, "seconds": 0}
    assert window["operator_ms_per_poll"] > 0
    assert 0 < window["lag"]["count"] < whole["lag"]["count"]
    assert 0 < window["gaps"]["count"] < whole["gaps"]["count"], window["gaps"]
    # Every watch's first status went out, as the API server counted it.
    assert whole["writes"]["status_patches"] >= 200, whole["writes"]
    assert run["startup"]["with_status_at_window_end"] == 200, run["startup"]
    # Jobs ended during the run (--smoke: 10 intervals on average) and were seen.
    assert whole["detection"]["detected"] > 0, whole["detection"]
    assert [t["target"] for t in run["targets"]] == [t["target"] for t in run["targets_whole_run"]]
    assert (tmp_path / "scale.png").is_file()
