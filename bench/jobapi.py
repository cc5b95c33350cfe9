"""The fake job service: the benchmarks' fast, seeded job API, and the demo's jobs.

Bench kit (no jobwatch layer). One service for every user: the benchmarks run this
script (or, bench/soak.py, its `Jobs` in-process), `make demo` runs it with --demo
(through demo/jobservice.py), and the e2e tests script their replies per path on the
same HTTP server (bench/jobhttp.py) through bench/jobscript.py.

    GET /api/jobs/{id}/status -> {"id", "status", "progress", "message"[, "resultLink"]}
    GET /stats                -> totals: polls, distinct jobs, completed, CPU seconds
    GET /stats/jobs           -> per job: [polls, first poll, first request answered COMPLETED,
                                 the job's end (wall clock; None: not ended yet)]
    GET /stats/requests       -> per job: the wall-clock time of every request, in order
                                 (?since=T: those at T or later, and the last one before)
    GET /stats/delays         -> per job, with --latency: each request's answer delay, s
                                 (-1: never answered), in the same order
    GET /stats/spans          -> per job: [arrival, end] of every request, in order (wall
                                 clock; end None: still in flight); ?since=T: those in
                                 flight at T or later, and the last one before T

The answers have the seed service's shape (as --demo's); each job's fate is
drawn once from an RNG seeded with (--seed, id). With probability --pending-fraction
the job stays PROCESSING forever (the fleet keeps polling at steady state). Otherwise:

- with --mean-seconds, the job ends at a wall-clock time: its first poll plus a duration
  drawn from an exponential distribution of that mean, independent of when it is polled,
  so the wait until the next poll is part of any detection latency timed from the end;
- without it, it answers COMPLETED from its k-th poll on, k geometric with mean
  --mean-polls (a fate that counts polls: reproducible whatever the timing; bench/soak.py).

--latency delays the answers to job polls: "lognormal:median=50ms,p99=1s,hang=0.5%"
draws each delay from a log-normal distribution with that median and 99th percentile,
and leaves the given share of requests unanswered for good (the client's timeout ends
them, as with a hung service). The delays are timers on the event loop, never a blocked
thread, so thousands of answers can be pending at once.

--slow N makes the jobs j0 ... j(N-1) (the watches w00000 ... of bench/scale.py and
bench/replicas.py poll them) answer every request in --slow-seconds (10), whatever
--latency says: longer than an operator's handover waits for its polls in flight.

A request is in flight from its arrival until its answer is written or, before that,
its client closes the connection (a client that gives a request up no longer waits for
it); /stats/spans tells both ends, so that a harness can find two requests of one job in
flight at once.

Ids starting with "x-" are probes for the HTTP client comparison: always pending, never
delayed, and counted apart, so they never dilute the operator's per-poll figures.

One process, uvloop, one listening socket per --port (the harness spreads its watches
over several, so that each port is a host of its own to the operator's per-host limits).
It prints "listening on PORT[,PORT...]" once it accepts connections. Its own CPU time is
in /stats, so the harness can tell whether it keeps up.

    .venv/bin/python bench/jobapi.py --port 0 --port 0 --seed 1 --mean-seconds 1000 \
        --latency lognormal:median=50ms,p99=1s,hang=0.5%

--demo serves the demo's jobs instead (`Phased`):

    POST /api/jobs             -> 201 {"id", "statusUrl"}   (starts a new job)
    GET  /api/jobs/{id}/status -> {"id", "status", "progress", "message", "resultLink"?}

A job is QUEUED for --queued seconds, then PROCESSING for --processing seconds, then
COMPLETED (with `resultLink`), or FAILED when its id contains "fail". A job asked about
before it was created starts at that moment, so a JobWatch can name any id. It prints
"demo job API on http://HOST:PORT" once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import random
import re
import time
from array import array
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import cast

import uvloop

from jobhttp import Answer, HttpProtocol, Request, Service

PREFIX, SUFFIX = "/api/jobs/", "/status"
PROBE = "x-"


Z_99 = 2.3263478740408408  # the standard normal's 99th percentile
HUNG = -1.0  # the delay recorded for a request never answered
OPEN = -1.0  # the end recorded for a request still in flight
Ticket = tuple[str, int]  # a job and the index of one of its requests


@dataclass(frozen=True)
class Latency:
    """How long the job API takes to answer a job poll: log-normal, plus a hung share."""

    median: float  # seconds
    p99: float
    hang: float  # share of requests never answered, 0..1

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / Z_99

    @property
    def mean(self) -> float:
        """Of the answered requests: median x exp(sigma^2 / 2)."""
        return self.median * math.exp(self.sigma**2 / 2)

    def draw(self, rng: random.Random) -> float | None:
        """Seconds until the answer; None: no answer at all."""
        if self.hang and rng.random() < self.hang:
            return None
        return rng.lognormvariate(math.log(self.median), self.sigma)

    def spec(self) -> str:
        return (
            f"lognormal:median={self.median * 1000:g}ms,p99={self.p99 * 1000:g}ms,"
            f"hang={self.hang * 100:g}%"
        )


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


def parse_latency(text: str) -> Latency | None:
    """ "none", or "lognormal:median=50ms,p99=1s[,hang=0.5%]"; ValueError if malformed."""
    if text.strip() in ("", "none"):
        return None
    kind, _, rest = text.strip().partition(":")
    if kind != "lognormal":
        raise ValueError(f"latency {text!r}: only lognormal:median=...,p99=...[,hang=...%]")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name not in ("median", "p99", "hang") or name in fields:
            raise ValueError(f"latency {text!r}: bad or repeated field {item!r}")
        fields[name] = value.strip()

    def seconds(name: str) -> float:
        match = _DURATION.match(fields.get(name, ""))
        if match is None:
            raise ValueError(f"latency {text!r}: {name} must be like 50ms or 1s")
        return float(match[1]) * (0.001 if match[2] == "ms" else 1.0)

    hang_text = fields.get("hang", "0%")
    if not hang_text.endswith("%"):
        raise ValueError(f"latency {text!r}: hang must be a percentage, like 0.5%")
    hang = float(hang_text[:-1]) / 100
    median, p99 = seconds("median"), seconds("p99")
    if not 0 < median < p99 or not 0 <= hang < 1:
        raise ValueError(f"latency {text!r}: needs 0 < median < p99 and 0 <= hang < 100%")
    return Latency(median, p99, hang)


class Job:
    __slots__ = ("completed_at", "ends_at", "first_poll", "polls", "target")

    def __init__(self, target: int | None, ends_at: float | None, now: float) -> None:
        self.target = target  # the poll that first answers COMPLETED; None: by time, or never
        self.ends_at = ends_at  # wall clock from which it answers COMPLETED; None: by polls
        self.polls = 0
        self.first_poll = now
        self.completed_at: float | None = None  # arrival of its first request answered COMPLETED


class Jobs:
    def __init__(
        self,
        seed: int,
        mean_polls: float,
        pending_fraction: float,
        *,
        mean_seconds: float | None = None,
        latency: Latency | None = None,
        slow: frozenset[str] = frozenset(),
        slow_seconds: float = 10.0,
    ) -> None:
        self.seed, self.pending_fraction = seed, pending_fraction
        self.mean_seconds = mean_seconds
        self.latency = latency
        self.slow, self.slow_seconds = slow, slow_seconds
        self.latency_rng = random.Random(f"{seed}/latency")
        # Geometric on {1, 2, ...} with mean M has success probability 1/M per poll.
        self._log_q = math.log1p(-1.0 / mean_polls) if mean_polls > 1 else None
        self.jobs: dict[str, Job] = {}
        self.arrivals: dict[str, array[float]] = {}  # wall clock of every poll, per job
        self.delays: dict[str, array[float]] = {}  # with --latency: each one's delay, -1: hung
        self.ends: dict[str, array[float]] = {}  # per poll, when it left flight; OPEN: not yet
        self.polls = 0
        self.probe_polls = 0
        self.after_completion = 0  # polls of a job after it answered COMPLETED: should be 0
        self.completed = 0
        self.delayed = 0  # answers given later than at once (--latency)
        self.hung = 0  # requests left unanswered for good (--latency)
        self.first_poll = 0.0  # wall clock of the first job poll, of the last new job
        self.last_first_poll = 0.0
        self.started = time.time()

    def _fate(self, job_id: str, now: float) -> tuple[int | None, float | None]:
        """(the poll that first answers COMPLETED, the wall-clock end); both None: never."""
        rng = random.Random(f"{self.seed}/{job_id}")
        if rng.random() < self.pending_fraction:
            return None, None
        if self.mean_seconds is not None:
            return None, now + rng.expovariate(1.0 / self.mean_seconds)
        if self._log_q is None:
            return 1, None
        return 1 + int(math.log(1.0 - rng.random()) / self._log_q), None

    def poll(self, job_id: str) -> bytes:
        if job_id.startswith(PROBE):
            self.probe_polls += 1
            return _pending(job_id, 0)
        now = time.time()
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Job(*self._fate(job_id, now), now)
            self.arrivals[job_id] = array("d")
            self.ends[job_id] = array("d")
            self.first_poll = self.first_poll or now
            self.last_first_poll = now
        self.polls += 1
        job.polls += 1
        self.arrivals[job_id].append(now)
        self.ends[job_id].append(OPEN)
        ended = (job.target is not None and job.polls >= job.target) or (
            job.ends_at is not None and now >= job.ends_at
        )
        if not ended:
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

    def respond(self, request: Request) -> Answer:
        path = request.path
        if request.method != "GET":
            return Answer(405, b'{"error": "only GET"}')
        if path.startswith(PREFIX) and path.endswith(SUFFIX):
            job_id = path[len(PREFIX) : -len(SUFFIX)]
            routed = self.poll_answer(job_id)
            tracked = not job_id.startswith(PROBE) and job_id in self.ends
            ticket = self.ticket(job_id) if tracked else None
            if routed is None:  # held: never answered
                return Answer(0, b"", None, ticket)
            return Answer(routed[0], routed[1], self.delay(job_id), ticket)
        if path == "/stats":
            return Answer(200, json.dumps(self.stats()).encode())
        if path == "/stats/jobs":
            return Answer(200, json.dumps(self.per_job()).encode())
        if path == "/stats/requests":
            return Answer(200, json.dumps(self.request_times(_since(request.target))).encode())
        if path == "/stats/delays":
            return Answer(200, json.dumps(self.request_delays()).encode())
        if path == "/stats/spans":
            return Answer(200, json.dumps(self.request_spans(_since(request.target))).encode())
        return Answer(404, b'{"error": "no such path"}')

    def poll_answer(self, job_id: str) -> tuple[int, bytes] | None:
        """(code, body) of a job poll; None holds it unanswered (subclasses that simulate
        a hung job service)."""
        return 200, self.poll(job_id)

    def ticket(self, job_id: str) -> Ticket:
        """The job's latest request, to tell when it leaves flight (`ended`)."""
        return job_id, len(self.ends[job_id]) - 1

    def ended(self, ticket: Hashable, gone: bool = False) -> None:
        """The request was answered or its client left; only the first end counts."""
        job_id, index = cast(Ticket, ticket)
        ends = self.ends[job_id]
        if ends[index] == OPEN:
            ends[index] = time.time()

    def delay(self, job_id: str) -> float | None:
        """Seconds to hold the answer to this request; None: never answer it."""
        if job_id in self.slow:
            self.delayed += 1
            return self.slow_seconds
        if self.latency is None or job_id.startswith(PROBE):
            return 0.0
        drawn = self.latency.draw(self.latency_rng)
        if drawn is None:
            self.hung += 1
        else:
            self.delayed += 1
        self.delays.setdefault(job_id, array("d")).append(HUNG if drawn is None else drawn)
        return drawn

    def stats(self) -> dict[str, object]:
        return {
            "now": time.time(),
            "started": self.started,
            "polls": self.polls,
            "probe_polls": self.probe_polls,
            "distinct": len(self.jobs),
            "completed": self.completed,
            "after_completion": self.after_completion,
            "delayed": self.delayed,
            "hung": self.hung,
            "first_poll": self.first_poll,
            "last_first_poll": self.last_first_poll,
            "cpu_s": time.process_time(),
        }

    def per_job(self) -> dict[str, list[float | int | None]]:
        """A job's end is told only once it has passed: the harness must not learn it early."""
        now = time.time()
        return {
            job_id: [
                job.polls,
                job.first_poll,
                job.completed_at,
                job.ends_at if job.ends_at is not None and job.ends_at <= now else None,
            ]
            for job_id, job in self.jobs.items()
        }

    def request_times(self, since: float | None = None) -> dict[str, list[float]]:
        """With `since`, a job's requests from then on and the last one before (the gap
        across `since`): at 100,000 jobs the whole history is too big to send."""
        if since is None:
            return {job_id: times.tolist() for job_id, times in self.arrivals.items()}
        return {
            job_id: times[max(0, bisect.bisect_left(times, since) - 1) :].tolist()
            for job_id, times in self.arrivals.items()
        }

    def request_delays(self) -> dict[str, list[float]]:
        return {job_id: delays.tolist() for job_id, delays in self.delays.items()}

    def request_spans(self, since: float | None = None) -> dict[str, list[list[float | None]]]:
        """With `since`, the requests still in flight at `since` or arriving later, and the
        last one before (an earlier request out across `since` can overlap a later one)."""
        found: dict[str, list[list[float | None]]] = {}
        for job_id, arrivals in self.arrivals.items():
            ends = self.ends[job_id]
            bound = -math.inf if since is None else since
            first = max(0, bisect.bisect_left(arrivals, bound) - 1)
            found[job_id] = [
                [arrivals[k], None if ends[k] == OPEN else ends[k]]
                for k in range(len(arrivals))
                if k >= first or ends[k] == OPEN or ends[k] >= bound
            ]
        return found


def _pending(job_id: str, polls: int) -> bytes:
    # Built by hand: json.dumps costs more than the rest of the request handling.
    return (
        f'{{"id": "{job_id}", "status": "PROCESSING", "progress": {polls % 100}, '
        f'"message": "still working"}}'
    ).encode()


def _since(target: str) -> float | None:
    """The `since` query parameter (wall-clock seconds), None if absent or malformed."""
    for pair in target.partition("?")[2].split("&"):
        name, _, text = pair.partition("=")
        if name == "since":
            try:
                return float(text)
            except ValueError:
                return None
    return None


class Phased:
    """The demo's jobs (`make demo`), in the seed service's shape: QUEUED for `queued`
    seconds from the first time a job is asked about (or created, POST /api/jobs), then
    PROCESSING for `processing` seconds, then COMPLETED with a `resultLink`, or FAILED
    when its id contains "fail"; so a JobWatch can name any id."""

    def __init__(self, queued: float, processing: float) -> None:
        self.queued, self.processing = queued, processing
        self.started: dict[str, float] = {}
        self._ids = itertools.count(1000)

    def status(self, job_id: str) -> dict[str, object]:
        started = self.started.setdefault(job_id, time.monotonic())
        elapsed = time.monotonic() - started
        if elapsed < self.queued:
            return {
                "id": job_id,
                "status": "QUEUED",
                "progress": 0,
                "message": "waiting for a worker",
            }
        if elapsed < self.queued + self.processing:
            progress = int(100 * (elapsed - self.queued) / self.processing)
            return {
                "id": job_id,
                "status": "PROCESSING",
                "progress": progress,
                "message": f"{progress}% done",
            }
        if "fail" in job_id:
            return {
                "id": job_id,
                "status": "FAILED",
                "progress": 100,
                "message": "the report generator ran out of memory",
            }
        return {
            "id": job_id,
            "status": "COMPLETED",
            "progress": 100,
            "message": "report ready",
            "resultLink": f"https://reports.example.com/results/{job_id}.pdf",
        }

    def respond(self, request: Request) -> Answer:
        path = request.path
        if path.startswith(PREFIX) and path.endswith(SUFFIX):
            if request.method != "GET":
                return Answer(405, b'{"error": "only GET"}')
            return Answer(200, json.dumps(self.status(path[len(PREFIX) : -len(SUFFIX)])).encode())
        if path == "/api/jobs":
            if request.method != "POST":
                return Answer(405, b'{"error": "only POST"}')
            job_id = str(next(self._ids))
            self.status(job_id)
            created = {"id": job_id, "statusUrl": f"{PREFIX}{job_id}{SUFFIX}"}
            return Answer(201, json.dumps(created).encode())
        return Answer(404, b'{"error": "no such path"}')

    def ended(self, ticket: Hashable, gone: bool = False) -> None:
        """Nothing is tracked per request."""


async def serve(
    host: str, ports: list[int], service: Service, banner: Callable[[list[int]], str]
) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: HttpProtocol(service), host, port, backlog=4096)
        for port in ports
    ]
    print(banner([int(server.sockets[0].getsockname()[1]) for server in servers]), flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", help="repeatable; 0: any free port (printed)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mean-polls", type=float, default=200.0)
    parser.add_argument(
        "--mean-seconds", type=float, default=None, help="jobs end at a wall-clock time"
    )
    parser.add_argument("--pending-fraction", type=float, default=0.2)
    parser.add_argument("--latency", default="none", help="e.g. lognormal:median=50ms,p99=1s")
    parser.add_argument(
        "--slow", type=int, default=0, metavar="N", help="jobs j0 ... j(N-1) answer slowly (0)"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=10.0, help="their answer time, s (10)"
    )
    demo = parser.add_argument_group("the demo's jobs (--demo): by time, not seeded")
    demo.add_argument("--demo", action="store_true", help="serve the demo's jobs")
    demo.add_argument("--queued", type=float, default=3.0, help="seconds a job stays QUEUED")
    demo.add_argument(
        "--processing", type=float, default=8.0, help="seconds a job stays PROCESSING"
    )
    args = parser.parse_args()
    if args.demo:
        host = args.host
        uvloop.run(
            serve(
                host,
                args.port or [0],
                Phased(args.queued, args.processing),
                lambda ports: f"demo job API on http://{host}:{ports[0]}",
            )
        )
        return
    try:
        latency = parse_latency(args.latency)
    except ValueError as exc:
        parser.error(str(exc))
    jobs = Jobs(
        args.seed,
        args.mean_polls,
        args.pending_fraction,
        mean_seconds=args.mean_seconds,
        latency=latency,
        slow=frozenset(f"j{k}" for k in range(args.slow)),
        slow_seconds=args.slow_seconds,
    )
    uvloop.run(
        serve(
            args.host,
            args.port or [0],
            jobs,
            lambda ports: "listening on " + ",".join(str(port) for port in ports),
        )
    )


if __name__ == "__main__":
    main()
