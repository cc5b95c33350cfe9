"""A stand-in for the Kubernetes API server on loopback, for the API client's unit tests.

Each request is recorded and handed to the test's `answer` function, which returns the
reply: a real HTTP exchange over a real socket, so that what is tested is what the
client sends and how it reads what comes back. What the API server itself does with
the requests (admission, RBAC, the uid test) is covered end to end in tests/e2e.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
from aiohttp import web


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    # The request itself: for an answer that streams (web.StreamResponse.prepare).
    request: web.Request | None = field(default=None, compare=False, repr=False)

    def json(self) -> Any:
        return json.loads(self.body)


class Drop(Exception):
    """Raised by an answer: the connection is closed without a reply."""


# A reply, or an awaitable of one: a stream that stays open, an answer that takes time.
Answer = Callable[[Seen], web.StreamResponse | Awaitable[web.StreamResponse]]


def reply(status: int = 200, body: Any = None) -> web.Response:
    return web.json_response({} if body is None else body, status=status)


def listing(version: str, *items: dict[str, Any], token: str | None = None) -> web.Response:
    meta = {"resourceVersion": version, **({"continue": token} if token else {})}
    return reply(200, {"items": list(items), "metadata": meta})


def stream(*events: tuple[str, dict[str, Any]]) -> web.Response:
    """A watch answer: one JSON event a line, then the end of the stream."""
    lines = "".join(json.dumps({"type": kind, "object": obj}) + "\n" for kind, obj in events)
    return web.Response(body=lines.encode(), content_type="application/json")


class LoopbackApi:
    def __init__(self, answer: Answer = lambda seen: reply(200)) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self.server = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(
            request.method,
            request.path,
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
            await request.read(),
            request,
        )
        self.seen.append(seen)
        try:
            answer = self.answer(seen)
            return await answer if inspect.isawaitable(answer) else answer
        except Drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # written to nobody

    async def __aenter__(self) -> LoopbackApi:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.server = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()

    def credentials(self, token: str = "t") -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=self.server, token=token, insecure=True)

    def path(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]
