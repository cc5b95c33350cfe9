"""One time-ordered queue and a fixed pool of workers for every watch.

A task per watch would cost memory and start-up time at 10k objects; here a
watch waiting for its next poll is one heap entry. The pool size caps requests
in flight. A key is at most once in the heap's live set and at most once in the
ready queue, and the heap is compacted when replaced or cancelled entries outnumber
the live ones, so nothing here grows beyond a small multiple of the number of watches.

A key runs at most once at a time: a key that comes due while its job still runs (an
edit planned a new poll meanwhile) is held and runs when the running job ends.

One event-loop timer stands for the earliest entry: no dispatcher task, no
timeout context per wake-up. At 2,000 polls/s those cost about 7 % of the CPU.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Collection, Hashable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
# Entries due within this much of a timer's firing are released with it: fewer
# wake-ups, and a timer that fires a hair early does not spin. Well inside
# watchbook.DEADLINE_SLACK, so a poll planned just past a deadline stays past it.
EARLY = 0.001
# The heap is rebuilt from the live entries when it holds more than twice as many,
# plus this many (so that small heaps are not rebuilt over and over).
COMPACT_SLACK = 1024


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class SchedulerMetrics(Protocol):
    """Where the scheduler reports its two figures (metrics.Metrics is one): the polls
    due and waiting for a worker, and how late each poll started against its plan.
    A protocol, so that the scheduler needs nothing of the metrics module."""

    @property
    def queued(self) -> _Gauge: ...

    @property
    def poll_lag(self) -> _Histogram: ...


class Scheduler(Generic[K]):
    def __init__(
        self,
        job: Callable[[K], Awaitable[None]],
        *,
        workers: int,
        metrics: SchedulerMetrics,
        clock: Callable[[], float],
    ) -> None:
        self._job, self._workers, self._metrics, self._clock = job, workers, metrics, clock
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, int] = {}  # key -> sequence of its one valid heap entry
        self._seq = 0
        self._ready: asyncio.Queue[tuple[K, float, int]] = asyncio.Queue()
        # key -> sequence of its one valid entry in the ready queue: a key released again
        # before a worker took it (an edit made it due at once) must still run once.
        self._released: dict[K, int] = {}
        self._running: set[K] = set()
        self._run_ended = asyncio.Event()  # a run ended (for `wait_idle`)
        self._held: dict[K, tuple[float, int]] = {}  # came due while running
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def schedule(self, key: K, at: float) -> None:
        """Runs `key` at time `at` of `clock`, replacing any earlier plan for it."""
        self._seq += 1
        self._live[key] = self._seq
        heapq.heappush(self._heap, (at, self._seq, key))
        if at < self._timer_at:
            self._arm(at)
        self._compact()

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)
        self._released.pop(key, None)
        self._held.pop(key, None)
        self._compact()

    async def wait_idle(self, keys: Collection[K]) -> None:
        """Returns once none of `keys` is running (cancel them first: this does not
        stop new runs)."""
        while any(key in self._running for key in keys):
            self._run_ended.clear()
            await self._run_ended.wait()

    def running(self, key: K) -> bool:
        """Whether `key`'s work is under way now."""
        return key in self._running

    def planned(self, key: K) -> bool:
        """Whether `key` has a run ahead: planned, due and waiting for a worker, or running."""
        return key in self._live or key in self._released or key in self._running

    @property
    def entries(self) -> int:
        """Heap entries, stale ones included (`jobwatch_scheduler_entries`)."""
        return len(self._heap)

    def _compact(self) -> None:
        # A cancelled or replaced entry would otherwise stay until its time comes: for a
        # suspended watch that is its deadline, up to a week away.
        if len(self._heap) > 2 * len(self._live) + COMPACT_SLACK:
            live = self._live
            self._heap = [entry for entry in self._heap if live.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    @property
    def queued(self) -> int:
        return self._ready.qsize()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.extend(
            asyncio.create_task(self._work(), name=f"jobwatch-worker-{n}")
            for n in range(self._workers)
        )
        if self._heap:
            self._arm(self._heap[0][0])

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop, self._timer, self._timer_at = None, None, float("inf")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _arm(self, at: float) -> None:
        if self._loop is None:
            return  # start() arms it
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._release_due)

    def _release_due(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        until = self._clock() + EARLY
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, seq, key = heapq.heappop(heap)
            if self._live.get(key) == seq:
                del self._live[key]
                self._released[key] = seq
                self._ready.put_nowait((key, at, seq))
        self._metrics.queued.set(self._ready.qsize())
        if heap:
            self._arm(heap[0][0])

    async def _work(self) -> None:
        while True:
            key, planned, seq = await self._ready.get()
            if self._released.get(key) != seq:  # released again since, or cancelled
                continue
            del self._released[key]
            if key in self._live:  # re-planned while it waited for a worker
                continue
            if key in self._running:
                self._held[key] = (planned, seq)
                continue
            self._metrics.poll_lag.observe(max(0.0, self._clock() - planned))
            self._running.add(key)
            try:
                await self._job(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The job guards itself (Poller.poll); this is the last line of defence.
                log.exception("poll of %s failed unexpectedly", key)
            finally:
                self._running.discard(key)
                self._run_ended.set()
                held = self._held.pop(key, None)
                if held is not None and key not in self._live:
                    self._released[key] = held[1]
                    self._ready.put_nowait((key, *held))
