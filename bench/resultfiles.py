"""Results files of the benchmarks: git state and host facts, the operator log's summary,
and `<prefix>-<start time>.json` written whole or not at all.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import psutil

from benchenv import REPO

_LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")


def log_summary(path: Path | None, top: int = 8) -> dict[str, Any]:
    """Warnings and errors in the operator's log, grouped with numbers and names masked."""
    counts: dict[str, int] = {}
    levels: dict[str, int] = {}
    if path is not None and path.exists():
        for line in path.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match is None:
                continue
            level, logger, message = match.groups()
            levels[level] = levels.get(level, 0) + 1
            shape = re.sub(r"\d+", "N", f"{level} {logger}: {message}")[:160]
            counts[shape] = counts.get(shape, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return {"by_level": levels, "top": [{"count": c, "message": m} for m, c in ranked]}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(changed),
        # What the figures depend on; changes under bench/ or docs/ do not matter.
        "operator_changes": [p for p in changed if p.startswith(("operator/", "pyproject"))],
    }


def host_facts() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save_results(result: dict[str, Any], directory: Path, prefix: str) -> Path:
    """`<prefix>-<start time>.json` in `directory`; shared by every benchmark here."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = result["started"].replace(":", "").replace("-", "")[:15]
    path = directory / f"{prefix}-{stamp}.json"
    # Through a .tmp file (git-ignored), so a broken run never leaves half a file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path
