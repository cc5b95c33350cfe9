"""Where the bench harnesses run: paths, names, the error type, the log line, durations.

Bench kit (no jobwatch layer: scripts and their shared library in bench/, imported by
name). Shared by bench/scale.py, bench/soak.py and bench/replicas.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
LOGS = REPO / "_out" / "bench"
# Git-ignored: a result is kept by copying it into bench/results/ with the figure that
# cites it (docs/benchmarks.md, "Keeping a result").
RESULTS = LOGS / "results"
PYTHON = sys.executable
NAMESPACE = "jobwatch-bench"
GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
JW_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
EVENTS_PATH = f"/api/v1/namespaces/{NAMESPACE}/events"
OPERATOR_NAMESPACE, OPERATOR_SA = "jobwatch-system", "jobwatch-operator"
MiB = 1024 * 1024


class BenchError(Exception):
    """The harness could not do its job (as opposed to: the figures are bad)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def go_duration(seconds: float) -> str:
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def parse_seconds(text: str) -> float | None:
    """A duration like the operator's settings take: 10s, 500ms, 1m (enough for these)."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        number = text.strip().removesuffix(unit)
        if text.strip().endswith(unit) and number.replace(".", "", 1).isdigit():
            return float(number) * factor
    return None


def parse_operator_env(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """`--operator-env NAME=VALUE` options as a dict (a usage error otherwise)."""
    extra = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--operator-env {item!r}: expected NAME=VALUE")
        extra[name] = value
    return extra
