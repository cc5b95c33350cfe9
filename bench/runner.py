"""How a bench harness runs: in an event loop that SIGTERM cancels, its children and
its control plane stopped however the run ends.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from benchenv import BenchError, log
from controlplane import stop_control_plane
from procs import Children


def run_harness(
    name: str, run: Callable[[Children], Awaitable[dict[str, Any]]], *, own_cluster: bool
) -> dict[str, Any] | int:
    """Runs a harness (scale, soak, replicas): its result, or the exit code of a run that
    failed (1) or was interrupted (130). Its child processes, and the control plane if
    the harness started it, are stopped however the run ended."""
    children = Children()

    async def guarded() -> dict[str, Any]:
        # SIGTERM as Ctrl-C: cancel, so that every `finally` (and the cleanup) runs.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(children)

    try:
        return asyncio.run(guarded())
    except (BenchError, TimeoutError) as exc:
        log(f"{name} harness failed: {exc!r}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130
    finally:
        # Outside the event loop, so that it runs however the run ended.
        children.stop_all()
        if own_cluster:
            stop_control_plane()
