"""/healthz: ok while the operator's long-lived parts run, 503 once one has stopped."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from jobwatch import __main__ as main_module
from jobwatch import handlers


async def get_healthz(listener: socket.socket) -> tuple[int, str]:
    port = listener.getsockname()[1]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        return response.status, await response.text()


async def test_healthz_fails_once_the_informer_has_stopped() -> None:
    service = handlers.Service()
    listener = main_module.listen("JOBWATCH_HEALTH_PORT", free_port())
    assert listener is not None
    original = handlers.service
    handlers.service = service
    runner = await main_module.serve_health(listener)
    try:
        service.informer = asyncio.create_task(asyncio.sleep(3600))
        assert await get_healthz(listener) == (200, "ok\n")
        service.informer.cancel()
        await asyncio.gather(service.informer, return_exceptions=True)
        assert await get_healthz(listener) == (503, "the JobWatch informer has stopped\n")
    finally:
        handlers.service = original
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
