"""The demo job API for `make demo`: bench/jobapi.py's --demo jobs, with the demo's options.

QUEUED, then PROCESSING, then COMPLETED (with `resultLink`), or FAILED when the job's id
contains "fail"; POST /api/jobs starts a new job. The one fake job service is
bench/jobapi.py: this script hands it its command line (the same process, so a pid file
still names the server).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

JOBAPI = Path(__file__).resolve().parents[1] / "bench" / "jobapi.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--queued", type=float, default=3.0, help="seconds a job stays QUEUED")
    parser.add_argument(
        "--processing", type=float, default=8.0, help="seconds a job stays PROCESSING"
    )
    args = parser.parse_args()
    argv = [sys.executable, str(JOBAPI), "--demo", "--host", args.host, "--port", str(args.port)]
    argv += ["--queued", str(args.queued), "--processing", str(args.processing)]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
