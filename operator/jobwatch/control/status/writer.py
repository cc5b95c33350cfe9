"""The status writer (layer: control): publishes watch state, `status` and Events,
politely to the API server at any fleet size.

- a phase or reason change is queued as urgent and written first;
- a still-pending watch's progress is written at most once per progress
  interval (one object, one write, however often it polls), on a grid so that the
  progress writes of many objects go out together (queue.py);
- latest wins: a watch queued twice is written once, with its state at write time;
- all status writes share one token bucket (`JOBWATCH_STATUS_QPS`);
- a write always sends the newest state of its object, a retry included: the queues
  hold the latest `Watch` submitted for each object, never an older one;
- each write (patcher.py) sends only what changed since the last, fenced by what
  this writer last knew of the stored status; a refusal is repaired, a status the API
  server cannot take goes without what came from the endpoint;
- whether the object is still this replica's (`may_write`) is asked right before each
  request, status and Event alike: a write that waited must not go out after the
  replica's lease ran out.

The status itself is rendered in core/render.py; Events are events.py's, with a budget
and a task of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any

from jobwatch.control.status.events import EventRecorder
from jobwatch.control.status.patcher import ForeignEnd, Sent, StatusPatcher
from jobwatch.control.status.queue import WriteQueue
from jobwatch.core.refs import ObjectRef
from jobwatch.core.render import STALLED
from jobwatch.core.watch import Watch
from jobwatch.kits.metrics import Metrics
from jobwatch.kits.ratelimit import TokenBucket
from jobwatch.kube.api import KubeApi

log = logging.getLogger(__name__)

# Before a failed status write is tried again.
RETRY_DELAY = 1.0
# Writes in flight at once. One writer's throughput is one round trip per write, and
# on a busy event loop a round trip takes several loop turns: a single writer then
# falls far below the token bucket's rate. One object is never written twice at once.
WRITERS = 8


class StatusWriter:
    def __init__(
        self,
        api: KubeApi,
        metrics: Metrics,
        *,
        qps: float,
        burst: int,
        event_qps: float,
        event_burst: int,
        progress_interval: float,
        wall: Callable[[], float],
        clock: Callable[[], float],
        identity: str,
        may_write: Callable[[ObjectRef], bool] = lambda ref: True,
        on_foreign_end: Callable[[dict[str, Any]], None] = lambda body: None,
    ) -> None:
        self._clock = clock
        # Called with the object as stored when a write was refused because another
        # replica ended the watch meanwhile: the end stands, the caller takes it in.
        self._on_foreign_end = on_foreign_end
        self._bucket = TokenBucket(qps, burst, clock)
        self._queue = WriteQueue(qps=qps, progress_interval=progress_interval, clock=clock)
        # The newest Watch submitted for each object: what any write of it sends. A spec
        # edit makes a new Watch for the same object; a retry must not bring back the old.
        self._latest: dict[ObjectRef, Watch] = {}
        self._patcher = StatusPatcher(
            api,
            metrics,
            identity=identity,
            wall=wall,
            clock=clock,
            may_write=may_write,
            tracked=self._latest.__contains__,
        )
        self._events = EventRecorder(
            api,
            metrics,
            qps=event_qps,
            burst=event_burst,
            wall=wall,
            clock=clock,
            may_write=may_write,
        )
        # Only the writer holding the gate waits, for work and then for a token, and picks
        # what to write once the token is there. Writers that each picked first and then
        # waited for their own token held a newly finished watch back behind all of them.
        # The round trips happen outside the gate, WRITERS of them at once.
        self._gate = asyncio.Lock()
        self._wake = asyncio.Event()  # the queues changed, or a write ended
        self._write_ended = asyncio.Event()  # for settle()
        # Set by flush(): retries must fit in its budget, and nothing is attempted after it.
        self._deadline: float | None = None
        self._given_up = 0
        metrics.status_backlog.source = self.backlog

    def submit(self, watch: Watch, *, urgent: bool) -> None:
        ref = watch.ref
        self._latest[ref] = watch
        if self._queue.put(watch, urgent=urgent, written_at=self._patcher.written_at(ref)):
            self._wake.set()

    def event(self, watch: Watch) -> None:
        """Records an Event for the watch's current phase; reason = the status reason."""
        reason, message = watch.shown
        self._events.record(
            watch.ref, warning=watch.phase in STALLED, reason=reason, message=message
        )

    def warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        """A Warning Event about the object that is no phase change (a deletion after the
        TTL that failed), within the same Event budget and aggregation."""
        self._events.record(ref, warning=True, reason=reason, message=message)

    def stored(self, ref: ObjectRef, status: object) -> None:
        """The object's `status` as taken in (None: it has none): what its first write
        expects to find. This writer's own writes since know better and are kept."""
        self._patcher.stored(ref, status)

    def forget(self, ref: ObjectRef) -> None:
        self._queue.remove(ref)
        self._patcher.forget(ref)
        self._latest.pop(ref, None)

    @property
    def pending(self) -> int:
        """Status writes queued."""
        return self._queue.pending

    def backlog(self) -> dict[str, int]:
        """What is queued, by kind (`jobwatch_status_backlog`)."""
        return {**self._queue.sizes(), "events": self._events.pending}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as writers:
            for _ in range(WRITERS):
                writers.create_task(self._writer(draining=False))
            writers.create_task(self._events.run())

    async def flush(self, budget: float) -> None:
        """Writes everything queued, progress included, ignoring the progress interval.

        Shutdown: a failed write is retried only if the retry fits in `budget`, nothing is
        attempted after it, and a request that gets no answer ends the flush at once.
        """
        self._deadline = self._clock() + budget
        self._given_up = 0
        try:
            async with asyncio.timeout(budget), asyncio.TaskGroup() as writers:
                for _ in range(WRITERS):
                    writers.create_task(self._writer(draining=True))
                writers.create_task(self._events.drain(self._deadline))
        except TimeoutError:
            pass
        left = self.pending + self._given_up + self._events.pending + self._events.given_up
        if left:
            log.warning("shutdown: %d status writes and Events were not written", left)

    async def settle(self, refs: Collection[ObjectRef], budget: float) -> None:
        """Returns once none of these objects has a phase or reason change queued or a
        write in flight (or after `budget` seconds): a handover, whose next holder adopts
        the watches from their status. Progress is left out: the handover carries it."""
        wanted = set(refs)

        def waiting() -> bool:
            return any(self._queue.busy(ref) for ref in wanted)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                while waiting():
                    self._write_ended.clear()
                    await self._write_ended.wait()

    async def _writer(self, *, draining: bool) -> None:
        while True:
            async with self._gate:
                item = await self._next(draining=draining)
            if item is None:
                return
            await self._write(item)

    async def _next(self, *, draining: bool) -> Watch | None:
        """The best thing to write once a token is there; the token is taken for it.

        None when there is nothing more to do: the shutdown budget is spent, or, draining,
        everything is written.
        """
        while not self._expired():
            delay = self._bucket.delay()
            if delay:
                # What arrives meanwhile, an end above all, competes for this token.
                await asyncio.sleep(delay)
                continue
            self._wake.clear()
            item, wait = self._queue.pop(draining=draining)
            if item is not None:
                self._bucket.take()
                return item
            if draining and not self.pending and not self._queue.inflight:
                return None
            # Nothing to write, or only objects being written: wait for a change.
            if self._deadline is not None:
                wait = min(wait, self._deadline - self._clock())
            try:
                async with asyncio.timeout(None if wait == float("inf") else wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
        return None

    def _expired(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline

    async def _write(self, watch: Watch) -> None:
        """Writes (the newest state of) a watch the queue marked in flight."""
        watch = self._latest.get(watch.ref, watch)
        try:
            await self._write_once(watch)
        except asyncio.CancelledError:
            self._resubmit(watch.ref)  # shutdown: the flush writes it
            raise
        finally:
            self._queue.inflight.discard(watch.ref)
            self._wake.set()
            self._write_ended.set()

    def _resubmit(self, ref: ObjectRef) -> None:
        latest = self._latest.get(ref)
        if latest is not None:  # not forgotten (deleted) meanwhile
            self.submit(latest, urgent=True)

    async def _write_once(self, watch: Watch) -> None:
        outcome = await self._patcher.write(watch)
        if isinstance(outcome, ForeignEnd):
            self.forget(watch.ref)
            self._on_foreign_end(outcome.body)
        elif outcome is Sent.NOT_OURS:
            # Its queued writes go; what is known of the object stays, for a bucket that
            # lapsed and comes back (the runtime submits its watches again then).
            self._queue.remove(watch.ref)
        elif outcome is Sent.RETRY or (outcome is Sent.UNANSWERED and self._deadline is None):
            await self._retry(watch)
        elif outcome is Sent.UNANSWERED:
            self._unanswered()

    async def _retry(self, watch: Watch) -> None:
        if self._deadline is not None and self._clock() + RETRY_DELAY >= self._deadline:
            self._given_up += 1  # shutdown: the retry would come after the budget
            return
        await asyncio.sleep(RETRY_DELAY)
        self._resubmit(watch.ref)  # its newest state, not the one that failed

    def _unanswered(self) -> None:
        """At shutdown, a request got no answer: the flush ends here.

        The API server is out of reach, or our client is already closed: every request
        left would fail alike, each costing a token and a log line.
        """
        if self._deadline is not None:
            self._given_up += 1
            self._deadline = min(self._deadline, self._clock())
