"""The scale benchmark's harness still works: `bench/scale.py --smoke` on the test cluster.

Not a performance assertion: only that the harness runs end to end (job API,
JobWatches, operator, measurements, HTTP client comparison) and writes results
in which the operator polled.
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
    assert run["cpu"]["operator_ms_per_poll"] > 0
    assert run["lag"]["count"] > 0
    assert (tmp_path / "scale.png").is_file()
