"""One time-ordered queue and a fixed pool of workers for every watch.

A task per watch would cost memory and start-up time at 10k objects; here a
watch waiting for its next poll is one heap entry. The pool size caps requests
in flight. A key is at most once in the heap's live set and at most once in the
ready queue, so nothing here grows beyond the number of watches.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from .metrics import Metrics

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


class Scheduler(Generic[K]):
    def __init__(
        self,
        job: Callable[[K], Awaitable[None]],
        *,
        workers: int,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self._job, self._workers, self._metrics, self._clock = job, workers, metrics, clock
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, int] = {}  # key -> sequence of its one valid heap entry
        self._seq = 0
        self._ready: asyncio.Queue[tuple[K, float]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def schedule(self, key: K, at: float) -> None:
        """Runs `key` at monotonic time `at`, replacing any earlier plan for it."""
        self._seq += 1
        self._live[key] = self._seq
        heapq.heappush(self._heap, (at, self._seq, key))
        if self._heap[0][1] == self._seq:
            self._wake.set()

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)

    @property
    def queued(self) -> int:
        return self._ready.qsize()

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._dispatch(), name="jobwatch-dispatch"))
        self._tasks.extend(
            asyncio.create_task(self._work(), name=f"jobwatch-worker-{n}")
            for n in range(self._workers)
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _dispatch(self) -> None:
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                at, seq, key = heapq.heappop(self._heap)
                if self._live.get(key) == seq:
                    del self._live[key]
                    self._ready.put_nowait((key, at))
            self._metrics.queued.set(self._ready.qsize())
            self._wake.clear()
            timeout = self._heap[0][0] - now if self._heap else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _work(self) -> None:
        while True:
            key, planned = await self._ready.get()
            if key in self._live:  # re-planned while it waited for a worker
                continue
            self._metrics.poll_lag.observe(max(0.0, self._clock() - planned))
            try:
                await self._job(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll of %s failed unexpectedly", key)
