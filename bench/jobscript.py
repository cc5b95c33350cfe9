"""The fake job service with replies scripted per path, for the e2e tests (tests/e2e).

Bench kit (no jobwatch layer): the e2e harness's `JobServer`, on the one fake job
service's HTTP server (bench/jobhttp.py) in an event loop of its own thread, so that
tests drive it from plain synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from jobhttp import Answer, HttpProtocol, Request, Slots


@dataclass
class Reply:
    code: int = 200
    body: Any = None  # dict/list → JSON; str → sent as is
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    at: float  # time.monotonic()
    method: str
    headers: dict[str, str]
    body: bytes
    concurrent: int = 0  # requests to the same path still in flight when it came
    in_server: int = 0  # requests to any path being answered or queued when it came
    # When it stopped being in flight: its answer sent, or its client gone before that
    # (`gone`). None: still in flight.
    end: float | None = None
    gone: bool = False


class Scripted:
    """What a `JobServer` answers: each path its replies in order, then the last again.

    Called on the server's event loop; `script` and `seen` from the tests' thread.
    """

    def __init__(self, capacity: int | None) -> None:
        self._routes: dict[str, list[Reply]] = {}
        self._seen: dict[str, list[Seen]] = {}
        self._active: dict[str, int] = {}
        self._in_server = 0
        self._lock = threading.Lock()
        self._slots = Slots(capacity) if capacity else None

    def script(self, path: str, replies: Sequence[Reply]) -> None:
        with self._lock:
            self._routes[path] = list(replies)

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return list(self._seen.get(path, []))

    def respond(self, request: Request) -> Answer:
        path = request.target
        with self._lock:
            active = self._active.get(path, 0)
            self._active[path] = active + 1
            seen = Seen(
                time.monotonic(),
                request.method,
                request.headers(),
                request.body,
                active,
                self._in_server,
            )
            requests = self._seen.setdefault(path, [])
            requests.append(seen)
            self._in_server += 1
            replies = self._routes.get(path)
            if not replies:
                reply = Reply(404, {"error": "no such path"})
            else:
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
        body = (
            reply.body.encode()
            if isinstance(reply.body, str)
            else b""
            if reply.body is None
            else json.dumps(reply.body).encode()
        )
        ticket = (path, len(requests) - 1)
        return Answer(reply.code, body, reply.delay, ticket, reply.headers, self._slots)

    def ended(self, ticket: Hashable, gone: bool = False) -> None:
        """The request is no longer in flight; only its first end counts."""
        path, index = cast(tuple[str, int], ticket)
        with self._lock:
            seen = self._seen[path][index]
            if seen.end is not None:
                return
            seen.end, seen.gone = time.monotonic(), gone
            self._active[path] -= 1
            self._in_server -= 1


class JobServer:
    """A job API on loopback whose answers each test scripts per path.

    A path answers its replies in order and then repeats the last one. With `capacity`,
    at most that many requests are answered at once (a reply's `delay` included) and the
    others queue, as at a service with that many workers.

    A request is in flight from its arrival until its answer is sent or, during a
    reply's `delay`, its client closes the connection: a client that gives a request up
    (its timeout, a replica killed) no longer waits for it, so it is not in flight any
    more even though no answer went out (`Seen.end`, `Seen.gone`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        capacity: int | None = None,
    ) -> None:
        self._scripted = Scripted(capacity)
        self._connections: set[HttpProtocol] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        def connection() -> HttpProtocol:
            protocol = HttpProtocol(self._scripted)
            self._connections.add(protocol)
            return protocol

        # A large backlog: the default drops the connections of a burst of first polls
        # (several operators adopting hundreds of watches at once), which would hang in
        # SYN retries, as no real job service behind a load balancer does.
        self._server = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(connection, host, 0, ssl=tls, backlog=1024), self._loop
        ).result(timeout=10)
        self.scheme = "http" if tls is None else "https"
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.host = host

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def script(self, path: str, replies: Sequence[Reply]) -> str:
        self._scripted.script(path, replies)
        return self.url(path)

    def seen(self, path: str) -> list[Seen]:
        return self._scripted.seen(path)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for protocol in self._connections:
                protocol.abort()
            await asyncio.sleep(0)  # the aborted connections' connection_lost

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
