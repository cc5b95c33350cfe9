"""What the status writer's tests share: a watch, a fake API that records what it is
sent, and a writer over it (test_status.py, test_status_queue.py, test_status_patch.py,
test_events.py)."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobwatch.control.status import writer as status
from jobwatch.control.status.writer import StatusWriter
from jobwatch.core.patch import Fence
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.errors import ApiError

# Longer than StatusWriter's retry delay: a retry that was going to come has come.
RETRY_WAIT = status.RETRY_DELAY + 0.3


def make_watch(name: str = "w", **fields: Any) -> Watch:
    now = time.time()
    watch = Watch(
        ref=ObjectRef("ns", name, f"uid-{name}"),
        generation=1,
        spec_hash="h",
        spec=None,
        compiled=None,
        suspended=False,
        start_time=now,
        deadline=now + 600,
    )
    for key, value in fields.items():
        setattr(watch, key, value)
    return watch


@dataclass(frozen=True)
class SentEvent:
    ref: ObjectRef
    warning: bool
    reason: str
    message: str
    count: int
    first_seen: datetime.datetime | None


class FakeApi:
    def __init__(self, fail_with: ApiError | None = None) -> None:
        self.patches: list[tuple[ObjectRef, dict[str, Any]]] = []
        self.events: list[SentEvent] = []
        self.fail_with = fail_with
        # Each Event creation takes the next of these, if any: an error to raise.
        self.event_failures: list[Exception] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        self.patches.append((ref, status))

    async def create_event(
        self,
        ref: ObjectRef,
        *,
        warning: bool,
        reason: str,
        message: str,
        count: int = 1,
        first_seen: datetime.datetime | None = None,
    ) -> None:
        if self.event_failures:
            raise self.event_failures.pop(0)
        self.events.append(SentEvent(ref, warning, reason, message, count, first_seen))


def make_writer(
    api: FakeApi,
    *,
    qps: float = 1000,
    burst: int = 1000,
    progress: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    metrics: Metrics | None = None,
    event_qps: float = 1000,
    event_burst: int = 1000,
    may_write: Callable[[ObjectRef], bool] = lambda ref: True,
) -> StatusWriter:
    return StatusWriter(
        api,  # type: ignore[arg-type]
        metrics or Metrics(),
        qps=qps,
        burst=burst,
        event_qps=event_qps,
        event_burst=event_burst,
        progress_interval=progress,
        wall=time.time,
        clock=clock,
        identity="me",
        may_write=may_write,
    )


async def until(predicate: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class TimedApi(FakeApi):
    """Records when each status write and Event went out, in one sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, float]] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        self.sent.append((ref.name, time.monotonic()))
        await super().patch_status(ref, status)

    async def create_event(self, ref: ObjectRef, **event: Any) -> None:
        self.sent.append(("event", time.monotonic()))
        await super().create_event(ref, **event)
