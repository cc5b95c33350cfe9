"""The operator's own HTTP endpoints (`/healthz`, `/metrics`) on sockets bound at start-up
(`__main__.listen`), so that a port problem stops the process before anything runs."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(listener: socket.socket, path: str, handler: Handler) -> web.AppRunner:
    """Serves GET `path` with `handler` on `listener`; `cleanup()` the runner to stop."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    return runner
