"""The scale benchmark's job API: a fast, seeded job status endpoint on loopback.

    GET /api/jobs/{id}/status -> {"id", "status", "progress", "message"[, "resultLink"]}
    GET /stats                -> totals: polls, distinct jobs, completed, CPU seconds
    GET /stats/jobs           -> per job: polls, first poll and first COMPLETED (wall clock)

The answers have the seed service's shape (demo/jobservice.py), but a job's fate
counts polls instead of seconds, so that a run is reproducible whatever the poll
timing: each id is drawn once from an RNG seeded with (--seed, id). With probability
--pending-fraction the job stays PROCESSING forever (the fleet keeps polling at
steady state); otherwise it answers COMPLETED from its k-th poll on, k geometric
with mean --mean-polls.

Ids starting with "x-" are probes for the HTTP client comparison: always pending and
counted apart, so they never dilute the operator's per-poll figures.

One process. It prints "listening on PORT" once it accepts connections. Its own
CPU time is in /stats, so the harness can tell whether it keeps up.

    .venv/bin/python bench/jobapi.py --port 0 --seed 1 --mean-polls 200 --pending-fraction 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import time

import uvloop
from aiohttp import web

PREFIX, SUFFIX = "/api/jobs/", "/status"
PROBE = "x-"
_HEADERS = {"content-type": "application/json"}


class Job:
    __slots__ = ("completed_at", "first_poll", "polls", "target")

    def __init__(self, target: int | None, now: float) -> None:
        self.target = target  # the poll that first answers COMPLETED; None: never
        self.polls = 0
        self.first_poll = now
        self.completed_at: float | None = None


class Jobs:
    def __init__(self, seed: int, mean_polls: float, pending_fraction: float) -> None:
        self.seed, self.pending_fraction = seed, pending_fraction
        # Geometric on {1, 2, ...} with mean M has success probability 1/M per poll.
        self._log_q = math.log1p(-1.0 / mean_polls) if mean_polls > 1 else None
        self.jobs: dict[str, Job] = {}
        self.polls = 0
        self.probe_polls = 0
        self.after_completion = 0  # polls of a job after it answered COMPLETED: should be 0
        self.completed = 0
        self.last_first_poll = 0.0
        self.started = time.time()

    def _target(self, job_id: str) -> int | None:
        rng = random.Random(f"{self.seed}/{job_id}")
        if rng.random() < self.pending_fraction:
            return None
        if self._log_q is None:
            return 1
        return 1 + int(math.log(1.0 - rng.random()) / self._log_q)

    def poll(self, job_id: str) -> bytes:
        if job_id.startswith(PROBE):
            self.probe_polls += 1
            return _pending(job_id, 0)
        now = time.time()
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(self._target(job_id), now)
            self.last_first_poll = now
        self.polls += 1
        job.polls += 1
        if job.target is None or job.polls < job.target:
            return _pending(job_id, job.polls)
        if job.completed_at is None:
            job.completed_at = now
            self.completed += 1
        else:
            self.after_completion += 1
        return (
            f'{{"id": "{job_id}", "status": "COMPLETED", "progress": 100, '
            f'"message": "report ready", '
            f'"resultLink": "https://reports.example.com/results/{job_id}.pdf"}}'
        ).encode()

    def stats(self) -> dict[str, object]:
        return {
            "now": time.time(),
            "started": self.started,
            "polls": self.polls,
            "probe_polls": self.probe_polls,
            "distinct": len(self.jobs),
            "completed": self.completed,
            "after_completion": self.after_completion,
            "last_first_poll": self.last_first_poll,
            "cpu_s": time.process_time(),
        }

    def per_job(self) -> dict[str, list[float | int | None]]:
        return {
            job_id: [job.polls, job.first_poll, job.completed_at, job.target]
            for job_id, job in self.jobs.items()
        }


def _pending(job_id: str, polls: int) -> bytes:
    # Built by hand: json.dumps costs more than the rest of the request handling.
    return (
        f'{{"id": "{job_id}", "status": "PROCESSING", "progress": {polls % 100}, '
        f'"message": "still working"}}'
    ).encode()


def make_handler(jobs: Jobs) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.Response:
        path = request.path
        if path.startswith(PREFIX) and path.endswith(SUFFIX) and request.method == "GET":
            return web.Response(body=jobs.poll(path[len(PREFIX) : -len(SUFFIX)]), headers=_HEADERS)
        if path == "/stats":
            return web.Response(body=json.dumps(jobs.stats()).encode(), headers=_HEADERS)
        if path == "/stats/jobs":
            return web.Response(body=json.dumps(jobs.per_job()).encode(), headers=_HEADERS)
        return web.Response(status=404, body=b'{"error": "no such path"}', headers=_HEADERS)

    # The low-level server: no router, no middlewares, no access log; about half
    # the CPU of a web.Application per request.
    return web.Server(handle, access_log=None)


async def serve(host: str, port: int, jobs: Jobs) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(make_handler(jobs), sock=sock, backlog=4096)
    print(f"listening on {sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mean-polls", type=float, default=200.0)
    parser.add_argument("--pending-fraction", type=float, default=0.2)
    args = parser.parse_args()
    jobs = Jobs(args.seed, args.mean_polls, args.pending_fraction)
    uvloop.run(serve(args.host, args.port, jobs))


if __name__ == "__main__":
    main()
