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

One process, uvloop. It prints "listening on PORT" once it accepts connections. Its own
CPU time is in /stats, so the harness can tell whether it keeps up.

    .venv/bin/python bench/jobapi.py --port 0 --seed 1 --mean-polls 200 --pending-fraction 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from typing import cast

import uvloop

PREFIX, SUFFIX = "/api/jobs/", "/status"
PROBE = "x-"


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
        self.first_poll = 0.0  # wall clock of the first job poll, of the last new job
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
            self.first_poll = self.first_poll or now
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
            "first_poll": self.first_poll,
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


class HttpProtocol(asyncio.Protocol):
    """Just enough HTTP/1.1 for GET with keep-alive (and pipelining, for free).

    Not aiohttp's server: measured on the 2-core machine, its low-level server and
    a web.Application both cost about 0.09 ms of CPU per request, this about 0.02 ms;
    at 2,000 polls/s that is 0.14 of a core handed back to the operator under test.
    """

    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs
        self._buffer = b""
        self._skip = 0  # body bytes of the current request still to discard
        self._transport: asyncio.Transport | None = None
        self._held = False  # a request got no answer: neither does anything after it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._held:
            return
        buffer = self._buffer + data if self._buffer else data
        replies: list[bytes] = []
        close = False
        while buffer and not close:
            if self._skip:
                taken = min(self._skip, len(buffer))
                buffer, self._skip = buffer[taken:], self._skip - taken
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    replies.append(_reply(431, b'{"error": "request head too large"}', True))
                    close = True
                break
            head, buffer = buffer[:end], buffer[end + 4 :]
            line, _, headers = head.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3:
                replies.append(_reply(400, b'{"error": "bad request line"}', True))
                close = True
                break
            method, target, version = parts
            lowered = headers.lower()
            close = version != b"HTTP/1.1" or b"connection: close" in lowered
            length = _content_length(lowered)
            if length is None:
                replies.append(_reply(400, b'{"error": "bad content-length"}', True))
                close = True
                break
            self._skip = length
            routed = self._route(method, target.decode("latin-1"))
            if routed is None:  # held: the client's timeout ends this connection
                self._held = True
                break
            code, body = routed
            replies.append(_reply(code, body, close))
        self._buffer = buffer
        if replies:
            transport.write(b"".join(replies))
        if close:
            transport.close()

    def _route(self, method: bytes, target: str) -> tuple[int, bytes] | None:
        """(code, body) of the reply; None holds the request unanswered (subclasses
        that simulate a hung job service)."""
        path = target.partition("?")[0]
        if method != b"GET":
            return 405, b'{"error": "only GET"}'
        if path.startswith(PREFIX) and path.endswith(SUFFIX):
            return 200, self._jobs.poll(path[len(PREFIX) : -len(SUFFIX)])
        if path == "/stats":
            return 200, json.dumps(self._jobs.stats()).encode()
        if path == "/stats/jobs":
            return 200, json.dumps(self._jobs.per_job()).encode()
        return 404, b'{"error": "no such path"}'


MAX_HEAD = 65536
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _reply(code: int, body: bytes, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        code,
        _REASONS[code],
        len(body),
        b"connection: close\r\n" if close else b"",
        body,
    )


def _content_length(lowered_headers: bytes) -> int | None:
    at = lowered_headers.find(b"content-length:")
    if at < 0:
        return 0
    value = lowered_headers[at + 15 :].partition(b"\r\n")[0].strip()
    return int(value) if value.isdigit() else None


async def serve(host: str, port: int, jobs: Jobs) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(jobs), host, port, backlog=4096)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
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
