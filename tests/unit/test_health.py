"""/healthz: ok while the operator's long-lived parts run, 503 once one has stopped."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiohttp
import pytest

from jobwatch import __main__ as main_module
from jobwatch.app.config import Config
from jobwatch.app.startup import Operator, Running
from loopback import free_port


async def get_healthz(listener: socket.socket) -> tuple[int, str]:
    port = listener.getsockname()[1]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        return response.status, await response.text()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Operator, socket.socket]]:
    """An operator whose /healthz is served, not started yet."""
    operator = Operator(Config.from_env({}), metrics_listener=None)
    listener = main_module.listen("JOBWATCH_HEALTH_PORT", free_port())
    assert listener is not None
    runner = await main_module.serve_health(listener, operator.problem)
    yield operator, listener
    await runner.cleanup()


@pytest.fixture
async def parts() -> AsyncIterator[Running]:
    """Stand-ins for what /healthz looks at: the long-lived tasks and the runtime."""
    informer, starter, electing = (asyncio.create_task(asyncio.sleep(3600)) for _ in range(3))
    yield Running(
        api=None,  # type: ignore[arg-type]
        http=None,  # type: ignore[arg-type]
        runtime=SimpleNamespace(writer_stopped=False),  # type: ignore[arg-type]
        informer=informer,
        starter=starter,
        elector=None,
        electing=electing,
        metrics_runner=None,
    )
    for task in (informer, starter, electing):
        await stop(task)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_healthz_is_ok_before_start_up(served: tuple[Operator, socket.socket]) -> None:
    _, listener = served
    assert await get_healthz(listener) == (200, "ok\n")


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ("informer", "the JobWatch informer has stopped"),
        ("electing", "the lease elector has stopped"),
        ("writer", "the status writer has stopped"),
    ],
)
async def test_healthz_fails_once_a_long_lived_part_has_stopped(
    served: tuple[Operator, socket.socket], parts: Running, part: str, problem: str
) -> None:
    operator, listener = served
    operator.running = parts
    assert await get_healthz(listener) == (200, "ok\n")
    if part == "writer":
        parts.runtime.writer_stopped = True  # type: ignore[misc]  # a stand-in's attribute
    else:
        await stop(getattr(parts, part))
    assert await get_healthz(listener) == (503, f"{problem}\n")
