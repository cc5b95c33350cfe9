"""The fake job service's HTTP/1.1 server: one asyncio protocol for every service of it.

Bench kit (no jobwatch layer). The services (bench/jobapi.py's seeded jobs and the
demo's jobs, bench/jobscript.py's scripted replies for the e2e tests) say what to answer
to a `Request` and when (`Answer`); this protocol parses requests, holds answers for
their delay, keeps pipelined answers in order and tells the service when a request
leaves flight: its answer written, or its client gone before that.
"""

from __future__ import annotations

import asyncio
import http
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple, Protocol, cast

MAX_HEAD = 65536


class Request:
    """One request as it came: method, target (path and query), header lines, body."""

    __slots__ = ("body", "head", "method", "target")

    def __init__(self, method: str, target: str, head: bytes, body: bytes) -> None:
        self.method, self.target, self.head, self.body = method, target, head, body

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def headers(self) -> dict[str, str]:
        """Lower-cased names, the first value of a repeated one; parsed only when asked
        (the bench's job polls never ask)."""
        found: dict[str, str] = {}
        for line in self.head.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                found.setdefault(
                    name.decode("latin-1").strip().lower(), value.decode("latin-1").strip()
                )
        return found


class Slots:
    """At most `capacity` answers under way at once (their delays included); the others
    wait their turn, as at a service with that many workers."""

    def __init__(self, capacity: int) -> None:
        self._free = capacity
        self._waiting: deque[Callable[[], None]] = deque()

    def take(self, start: Callable[[], None]) -> None:
        if self._free:
            self._free -= 1
            start()
        else:
            self._waiting.append(start)

    def give(self) -> None:
        if self._waiting:
            self._waiting.popleft()()
        else:
            self._free += 1

    def forget(self, start: Callable[[], None]) -> bool:
        """Takes a waiting answer out of the line; False if it had started."""
        try:
            self._waiting.remove(start)
        except ValueError:
            return False
        return True


class Answer(NamedTuple):
    code: int
    body: bytes
    delay: float | None = 0.0  # seconds until it is sent; None: never (the request hangs)
    ticket: Hashable | None = None  # handed to the service's `ended`; None: not tracked
    headers: Mapping[str, str] | None = None  # beyond content-type (overridable) and length
    slots: Slots | None = None  # the workers it waits for, if the service has a capacity


class Service(Protocol):
    def respond(self, request: Request) -> Answer: ...

    def ended(self, ticket: Hashable, gone: bool = False) -> None:
        """The request left flight: answered, or (`gone`) its client closed first."""


class _Started:
    """An answer that waits for a worker (`Slots`), then for its delay."""

    __slots__ = ("handle", "started")

    def __init__(self) -> None:
        self.started = False
        self.handle: asyncio.TimerHandle | None = None


class HttpProtocol(asyncio.Protocol):
    """Just enough HTTP/1.1 for keep-alive (and pipelining, for free).

    Not aiohttp's server: its low-level server and a web.Application both cost several
    times this parser's CPU per request, and at the bench's rates every bit of the job
    service's CPU is taken from the operator under test on the same cores.
    """

    def __init__(self, service: Service) -> None:
        self._service = service
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._held = False  # a request got no answer: neither does anything after it
        self._due = 0.0  # loop time of the last delayed answer: later ones keep the order
        self._pending = 0  # answers scheduled and not sent yet
        self._open: set[Hashable] = set()  # tracked requests not answered yet
        self._waiting: dict[Hashable, tuple[Slots, Callable[[], None], _Started]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # The client closed (or the server): nobody waits for these answers any more.
        for slots, start, state in self._waiting.values():
            if not slots.forget(start):
                if state.handle is not None:
                    state.handle.cancel()
                slots.give()
        self._waiting.clear()
        for ticket in self._open:
            self._service.ended(ticket, True)
        self._open.clear()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._held:
            return
        buffer = self._buffer + data if self._buffer else data
        replies: list[bytes] = []
        answered: list[Hashable] = []  # tracked requests among `replies`
        close = False
        while buffer and not close:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    replies.append(_reply(431, b'{"error": "request head too large"}', True))
                    close = True
                break
            head = buffer[:end]
            line, _, headers = head.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3:
                replies.append(_reply(400, b'{"error": "bad request line"}', True))
                close = True
                break
            method, target, version = parts
            lowered = headers.lower()
            length = _content_length(lowered)
            if length is None:
                replies.append(_reply(400, b'{"error": "bad content-length"}', True))
                close = True
                break
            if len(buffer) < end + 4 + length:
                break  # the body is still on its way
            body, buffer = buffer[end + 4 : end + 4 + length], buffer[end + 4 + length :]
            close = version != b"HTTP/1.1" or b"connection: close" in lowered
            verb = method.decode("latin-1")
            answer = self._service.respond(Request(verb, target.decode("latin-1"), headers, body))
            ticket = answer.ticket
            if answer.delay is None:  # held: the client's timeout ends this connection
                if ticket is not None:
                    self._open.add(ticket)
                self._held = True
                break
            reply = _reply(answer.code, answer.body, close, answer.headers, verb == "HEAD")
            if self._later(answer, answer.delay, reply, close):
                continue
            replies.append(reply)
            if ticket is not None:
                answered.append(ticket)
        self._buffer = buffer
        if replies:
            transport.write(b"".join(replies))
            for ticket in answered:
                self._service.ended(ticket)
        if close and not self._pending:
            transport.close()

    def _later(self, answer: Answer, delay: float, reply: bytes, close: bool) -> bool:
        """Schedules the reply if it is not to go out now (with the others of this read)."""
        ticket = answer.ticket
        if answer.slots is not None:
            self._take(answer.slots, delay, reply, close, ticket)
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        if delay <= 0 and self._due <= now:
            return False
        # Pipelined answers go out in order: none before the one delayed ahead of it.
        self._due = max(now + delay, self._due)
        if ticket is not None:
            self._open.add(ticket)
        self._pending += 1
        loop.call_at(self._due, self._send, reply, close, ticket)
        return True

    def _take(
        self, slots: Slots, delay: float, reply: bytes, close: bool, ticket: Hashable | None
    ) -> None:
        """Waits for a worker, then for `delay`, then sends; the worker is given back when
        the answer is sent or its client left."""
        state = _Started()
        key: Hashable = ticket if ticket is not None else state

        def send() -> None:
            self._waiting.pop(key, None)
            self._send(reply, close, ticket)
            slots.give()

        def start() -> None:
            state.started = True
            state.handle = asyncio.get_running_loop().call_later(delay, send)

        if ticket is not None:
            self._open.add(ticket)
        self._pending += 1
        self._waiting[key] = (slots, start, state)
        slots.take(start)

    def _send(self, reply: bytes, close: bool, ticket: Hashable | None) -> None:
        self._pending -= 1
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if ticket is not None:
            self._open.discard(ticket)
            self._service.ended(ticket)
        if close:
            transport.close()


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _reason(code: int) -> bytes:
    found = _REASONS.get(code)
    if found is not None:
        return found
    try:
        return http.HTTPStatus(code).phrase.encode()
    except ValueError:
        return b"Unknown"


def _reply(
    code: int,
    body: bytes,
    close: bool,
    headers: Mapping[str, str] | None = None,
    head_only: bool = False,
) -> bytes:
    if headers is None:  # the job polls' path: nothing to merge
        lines = b"content-type: application/json\r\n"
    else:
        merged = {"content-type": "application/json", **headers}
        lines = "".join(f"{name}: {value}\r\n" for name, value in merged.items()).encode("latin-1")
    return b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n%s\r\n%s" % (
        code,
        _reason(code),
        lines,
        len(body),
        b"connection: close\r\n" if close else b"",
        b"" if head_only else body,
    )


def _content_length(lowered_headers: bytes) -> int | None:
    at = lowered_headers.find(b"content-length:")
    if at < 0:
        return 0
    value = lowered_headers[at + 15 :].partition(b"\r\n")[0].strip()
    return int(value) if value.isdigit() else None
