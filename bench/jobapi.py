"""The scale benchmark's job API: a fast, seeded job status endpoint on loopback.

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

The answers have the seed service's shape (demo/jobservice.py); each job's fate is
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
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import re
import time
from array import array
from dataclasses import dataclass
from typing import cast

import uvloop

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

    def ticket(self, job_id: str) -> Ticket:
        """The job's latest request, to tell when it leaves flight (`ended`)."""
        return job_id, len(self.ends[job_id]) - 1

    def ended(self, ticket: Ticket) -> None:
        """The request was answered or its client left; only the first end counts."""
        job_id, index = ticket
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
        self._due = 0.0  # loop time of the last delayed answer: later ones keep the order
        self._open: set[Ticket] = set()  # job polls of this connection not answered yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # The client closed (or the server): nobody waits for these answers any more.
        for ticket in self._open:
            self._jobs.ended(ticket)
        self._open.clear()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._held:
            return
        loop = asyncio.get_running_loop()
        buffer = self._buffer + data if self._buffer else data
        replies: list[bytes] = []
        answered: list[Ticket] = []  # job polls among `replies`
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
            path = target.decode("latin-1")
            routed = self._route(method, path)
            delay = self._delay(method, path) if routed is not None else 0.0
            ticket = self._ticket(method, path)
            if routed is None or delay is None:  # held: the client's timeout ends this connection
                if ticket is not None:
                    self._open.add(ticket)
                self._held = True
                break
            reply = _reply(routed[0], routed[1], close)
            now = loop.time()
            if delay <= 0 and self._due <= now:
                replies.append(reply)
                if ticket is not None:
                    answered.append(ticket)
                continue
            # Pipelined answers go out in order: none before the one delayed ahead of it.
            self._due = max(now + delay, self._due)
            if ticket is not None:
                self._open.add(ticket)
            loop.call_at(self._due, self._send, reply, close, ticket)
        self._buffer = buffer
        if replies:
            transport.write(b"".join(replies))
            for ticket in answered:
                self._jobs.ended(ticket)
        if close and self._due <= loop.time():
            transport.close()

    def _send(self, reply: bytes, close: bool, ticket: Ticket | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if ticket is not None:
            self._open.discard(ticket)
            self._jobs.ended(ticket)
        if close:
            transport.close()

    def _ticket(self, method: bytes, target: str) -> Ticket | None:
        """The job poll this request is (see `_route`), None for anything else."""
        path = target.partition("?")[0]
        if method == b"GET" and path.startswith(PREFIX) and path.endswith(SUFFIX):
            job_id = path[len(PREFIX) : -len(SUFFIX)]
            if not job_id.startswith(PROBE):
                return self._jobs.ticket(job_id)
        return None

    def _delay(self, method: bytes, target: str) -> float | None:
        path = target.partition("?")[0]
        if method == b"GET" and path.startswith(PREFIX) and path.endswith(SUFFIX):
            return self._jobs.delay(path[len(PREFIX) : -len(SUFFIX)])
        return 0.0

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
        if path == "/stats/requests":
            return 200, json.dumps(self._jobs.request_times(_since(target))).encode()
        if path == "/stats/delays":
            return 200, json.dumps(self._jobs.request_delays()).encode()
        if path == "/stats/spans":
            return 200, json.dumps(self._jobs.request_spans(_since(target))).encode()
        return 404, b'{"error": "no such path"}'


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


async def serve(host: str, ports: list[int], jobs: Jobs) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: HttpProtocol(jobs), host, port, backlog=4096)
        for port in ports
    ]
    bound = ",".join(str(server.sockets[0].getsockname()[1]) for server in servers)
    print(f"listening on {bound}", flush=True)
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
    args = parser.parse_args()
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
    uvloop.run(serve(args.host, args.port or [0], jobs))


if __name__ == "__main__":
    main()
