"""Publishing watch state: `status` with its conditions, and Events.

The writer is polite to the API server at any fleet size:
- a phase or reason change is queued as urgent and written first;
- a still-pending watch's progress is written at most once per progress
  interval (one object, one write, however often it polls), on a grid so that the
  progress writes of many objects go out together (PROGRESS_GRID_SHARE);
- latest wins: a watch queued twice is written once, with its state at write time;
- a status identical to the one last written is never sent, and a write sends only the
  fields that changed since (a progress write: attempts, poll times, last response);
- all writes, Events included, share one token bucket (`JOBWATCH_STATUS_QPS`), and
  queued Events get at least one token in EVENT_TURN;
- a write always sends the newest state of its object, a retry included: the queues
  hold the latest `Watch` submitted for each object, never an older one;
- a status the API server cannot take (not encodable, or refused as invalid) is written
  again without its result and last response, saying why, instead of being retried
  forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .kube import ApiError, EncodedStatus, KubeApi, ObjectRef, encode_json
from .logs import about
from .metrics import Metrics
from .policy import Phase
from .watch import Watch, format_time, format_time_seconds

log = logging.getLogger(__name__)

_ACTIVE = (Phase.PENDING, Phase.POLLING)
_STALLED = (Phase.FAILED, Phase.TIMED_OUT)
MAX_EVENTS_QUEUED = 1000
# Of the tokens, Events get at least one in this many while any is queued. Status goes
# first otherwise, and a start-up of thousands of watches once kept every token for
# first statuses for minutes: 0 Events created, 19,904 dropped from the full queue.
EVENT_TURN = 6
RETRY_DELAY = 1.0
# Writes in flight at once. One writer's throughput is one round trip per write, and
# on a busy event loop a round trip takes several loop turns: a single writer then
# falls far below the token bucket's rate. One object is never written twice at once.
WRITERS = 8
# A progress write falls due its progress interval after its object's last write, and
# written the moment it falls due, each wakes an idle operator three times (its token,
# the answer, the echo). Instead, due times are rounded up to a grid of this share of
# the interval: the writes of one grid step go out together, their answers and echoes
# come back together, and as each object's next write falls due an interval after this
# one, the groups persist. A step takes at most what the token bucket refills in a step
# (more would go out one token at a time, and stay so); the rest go to the next steps.
# None is early.
PROGRESS_GRID_SHARE = 1 / 15
MAX_PROGRESS_GRID = 1.0
# Steps looked at for room before a write goes into a full one anyway.
MAX_GRID_PROBES = 64
# A message is a sentence; anything longer was built from something it should not hold.
MAX_MESSAGE = 4096
# The parts of a status that come from the endpoint: what is dropped when the API server
# cannot take the status as it is.
_FROM_ENDPOINT = ("result", "lastResponse")
# Every field `render` writes, in its order: what the writer remembers of a status it
# wrote is one hash per field, in this order (0: the field is absent).
FIELDS = (
    "phase",
    "reason",
    "message",
    "attempts",
    "consecutiveErrors",
    "startTime",
    "deadline",
    "lastPollTime",
    "nextPollTime",
    "completionTime",
    "lastResponse",
    "lastError",
    "result",
    "observedGeneration",
    "specHash",
    "conditions",
)
# How a status that was not encodable is encoded once the endpoint's parts are out:
# anything else unexpected becomes a string rather than failing the write again.
_encode_leniently = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def _condition(
    watch: Watch, kind: str, *, true: bool, reason: str, message: str, now: float
) -> dict[str, Any]:
    status = "True" if true else "False"
    previous = watch.transitions.get(kind)
    if previous is None or previous[0] != status:
        watch.transitions[kind] = (status, now)
    return {
        "type": kind,
        "status": status,
        "observedGeneration": watch.generation,
        "lastTransitionTime": format_time_seconds(watch.transitions[kind][1]),
        "reason": reason,
        "message": message,
    }


def render(watch: Watch, now: float) -> dict[str, Any]:
    """The whole `status` for `watch`; a None value means the field is absent."""
    phase, reason, message = watch.phase, watch.reason, watch.message[:MAX_MESSAGE]
    finished = watch.finished
    reconciling_reason = "Suspended" if watch.suspended and not finished else reason
    reconciling_message = (
        "polling is suspended (spec.suspend); the deadline keeps counting"
        if watch.suspended and not finished
        else message
    )
    conditions = [
        _condition(
            watch, "Ready", true=phase == Phase.SUCCEEDED, reason=reason, message=message, now=now
        ),
        _condition(
            watch,
            "Reconciling",
            true=phase in _ACTIVE,
            reason=reconciling_reason,
            message=reconciling_message,
            now=now,
        ),
        _condition(
            watch, "Stalled", true=phase in _STALLED, reason=reason, message=message, now=now
        ),
        _condition(watch, "Finished", true=finished, reason=reason, message=message, now=now),
    ]
    error = watch.last_error
    return {
        "phase": phase.value,
        "reason": reason,
        "message": message,
        "attempts": watch.attempts,
        "consecutiveErrors": watch.consecutive_errors,
        "startTime": format_time(watch.start_time),
        "deadline": format_time(watch.deadline),
        "lastPollTime": format_time(watch.last_poll_time) if watch.last_poll_time else None,
        "nextPollTime": (
            format_time(watch.next_poll_time)
            if watch.next_poll_time and not finished and not watch.suspended
            else None
        ),
        "completionTime": format_time(watch.completion_time) if watch.completion_time else None,
        "lastResponse": watch.last_response,
        "lastError": {"class": error.error_class.value, "message": error.message}
        if error
        else None,
        "result": watch.result,
        "observedGeneration": watch.generation,
        "specHash": watch.spec_hash,
        "conditions": conditions,
    }


def _minimal(watch: Watch, exc: Exception) -> dict[str, Any]:
    """What is written when `render` fails: the phase and why the rest is missing."""
    return {
        "phase": watch.phase.value,
        "reason": watch.reason,
        "message": f"status could not be rendered ({type(exc).__name__}); "
        "the operator's log has the details",
        "attempts": watch.attempts,
        "observedGeneration": watch.generation,
        "specHash": watch.spec_hash,
    }


def _without_endpoint_parts(status: dict[str, Any], why: str) -> dict[str, Any]:
    """`status` without what came from the endpoint, its message saying so."""
    left = {key: value for key, value in status.items() if key not in _FROM_ENDPOINT}
    note = f"; result and last response left out: the status was {why}"
    left["message"] = (str(status.get("message", "")) + note)[:MAX_MESSAGE]
    return left


def _encode(status: dict[str, Any], encode: Callable[[Any], str]) -> dict[str, str]:
    """The JSON text of each field that is present."""
    return {key: encode(value) for key, value in status.items() if value is not None}


def _digest(texts: dict[str, str]) -> array[int]:
    """One hash per field of FIELDS (0: absent): all the writer keeps of a written status,
    about 200 bytes a watch, to skip a status already written and to send only the fields
    that changed."""
    return array("q", [hash(texts[key]) if key in texts else 0 for key in FIELDS])


def _changed(written: array[int], now: array[int]) -> tuple[str, ...] | None:
    """The fields that differ from the status written before, or None when one was
    removed: a JSON patch can only remove what is certainly there, so such a status
    (an end clears `nextPollTime`) is written whole."""
    if any(new == 0 and old != 0 for old, new in zip(written, now, strict=True)):
        return None
    return tuple(key for key, old, new in zip(FIELDS, written, now, strict=True) if old != new)


@dataclass(slots=True)
class _Written:
    """What the writer knows of the status an object holds: the hashes of what it last
    wrote there, when, and whether that is what the object holds (False: a reduced
    status went out instead, see `_without_endpoint_parts`; the next write is whole)."""

    digest: array[int]
    at: float
    exact: bool


@dataclass(frozen=True, slots=True)
class _Event:
    ref: ObjectRef
    warning: bool
    reason: str
    message: str


class TokenBucket:
    """`rate` tokens a second, `burst` at most, and none taken on credit.

    A token is taken once it is there, for the write chosen at that moment.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens, self._stamp = float(burst), clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def delay(self) -> float:
        """How long until a token is there; 0 when one is."""
        self._refill()
        return max(0.0, (1 - self._tokens) / self._rate)

    def take(self) -> None:
        self._refill()
        self._tokens -= 1


class StatusWriter:
    def __init__(
        self,
        api: KubeApi,
        metrics: Metrics,
        *,
        qps: float,
        burst: int,
        progress_interval: float,
        wall: Callable[[], float],
        clock: Callable[[], float],
        may_write: Callable[[ObjectRef], bool] = lambda ref: True,
    ) -> None:
        self._api, self._metrics = api, metrics
        # With replicas: is the object's bucket still this one's? A replica that lost it
        # (renew deadline passed, taken over) must not overwrite the new holder's status.
        self._may_write = may_write
        self._progress_interval = progress_interval
        self._grid = min(MAX_PROGRESS_GRID, progress_interval * PROGRESS_GRID_SHARE)
        self._step_room = max(1, int(qps * self._grid))
        self._steps: dict[int, int] = {}  # grid step -> progress writes planned in it
        self._wall, self._clock = wall, clock
        self._bucket = TokenBucket(qps, burst, clock)
        # Ends first: a finished watch is what `kubectl wait` and pipelines wait for,
        # and during a burst (thousands of new watches) it must not queue behind
        # Pending -> Polling transitions.
        self._final: OrderedDict[ObjectRef, Watch] = OrderedDict()
        self._urgent: OrderedDict[ObjectRef, Watch] = OrderedDict()
        # progress writes: ref -> (watch, sequence), and a heap of when each is due
        self._progress: dict[ObjectRef, tuple[Watch, int]] = {}
        self._progress_due: list[tuple[float, int, ObjectRef]] = []
        self._seq = 0
        self._events: asyncio.Queue[_Event] = asyncio.Queue(MAX_EVENTS_QUEUED)
        self._written: dict[ObjectRef, _Written] = {}
        # The newest Watch submitted for each object: what any write of it sends. A spec
        # edit makes a new Watch for the same object; a retry must not bring back the old.
        self._latest: dict[ObjectRef, Watch] = {}
        # Only the writer holding the gate waits, for work and then for a token, and picks
        # what to write once the token is there. Writers that each picked first and then
        # waited for their own token held a newly finished watch back behind all of them.
        # The round trips happen outside the gate, WRITERS of them at once.
        self._gate = asyncio.Lock()
        self._wake = asyncio.Event()  # the queues changed, or a write ended
        self._dropping = False
        self._since_event = 0  # status writes taken since the last Event
        self._inflight: set[ObjectRef] = set()
        self._write_ended = asyncio.Event()  # for settle()
        # Set by flush(): retries must fit in its budget, and nothing is attempted after it.
        self._deadline: float | None = None
        self._given_up = 0
        metrics.status_backlog.source = self.backlog

    def submit(self, watch: Watch, *, urgent: bool) -> None:
        ref = watch.ref
        self._latest[ref] = watch
        if urgent:
            self._progress.pop(ref, None)
            if ref in self._final or watch.finished:
                self._urgent.pop(ref, None)
                self._final[ref] = watch  # latest wins, also over a re-run's new state
            else:
                self._urgent[ref] = watch
            self._wake.set()
        elif ref not in self._urgent and ref not in self._final and ref not in self._progress:
            written = self._written.get(ref)
            now = self._clock()
            due = written.at + self._progress_interval if written else now
            if self._grid > 0 and due > now:
                due = self._step(due, now)
            self._seq += 1
            self._progress[ref] = (watch, self._seq)
            heapq.heappush(self._progress_due, (due, self._seq, ref))
            if self._progress_due[0][1] == self._seq:  # the new earliest: re-arm the wait
                self._wake.set()

    def event(self, watch: Watch) -> None:
        """Queues an Event for the watch's current phase; reason = the status reason."""
        warning = watch.phase in _STALLED
        try:
            self._events.put_nowait(_Event(watch.ref, warning, watch.reason, watch.message))
        except asyncio.QueueFull:
            self._metrics.events_dropped.inc()
            if not self._dropping:  # once per overflow, not once per event
                log.warning("event queue full (%d): dropping Events", MAX_EVENTS_QUEUED)
            self._dropping = True
        self._wake.set()

    def _step(self, due: float, now: float) -> float:
        """`due` rounded up to the grid, in the first step from there with room."""
        step = math.ceil(due / self._grid)
        for _ in range(MAX_GRID_PROBES):
            if self._steps.get(step, 0) < self._step_room:
                break
            step += 1
        self._steps[step] = self._steps.get(step, 0) + 1
        if len(self._steps) > 4 * self._progress_interval / self._grid:
            # Steps past: nothing is planned in them any more.
            past = math.floor(now / self._grid)
            self._steps = {k: v for k, v in self._steps.items() if k >= past}
        return step * self._grid

    def forget(self, ref: ObjectRef) -> None:
        self._final.pop(ref, None)
        self._urgent.pop(ref, None)
        self._progress.pop(ref, None)
        self._written.pop(ref, None)
        self._latest.pop(ref, None)

    @property
    def pending(self) -> int:
        return len(self._final) + len(self._urgent) + len(self._progress) + self._events.qsize()

    def backlog(self) -> dict[str, int]:
        """What is queued, by kind (`jobwatch_status_backlog`)."""
        return {
            "final": len(self._final),
            "urgent": len(self._urgent),
            "progress": len(self._progress),
            "events": self._events.qsize(),
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as writers:
            for _ in range(WRITERS):
                writers.create_task(self._writer(draining=False))

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
        except TimeoutError:
            pass
        if left := self.pending + self._given_up:
            log.warning("shutdown: %d status writes and Events were not written", left)

    async def settle(self, refs: Collection[ObjectRef], budget: float) -> None:
        """Returns once none of these objects has a phase or reason change queued or a
        write in flight (or after `budget` seconds): a handover, whose next holder adopts
        the watches from their status. Progress is left out: the handover carries it."""
        wanted = set(refs)

        def waiting() -> bool:
            return any(
                ref in self._final or ref in self._urgent or ref in self._inflight for ref in wanted
            )

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
            if isinstance(item, _Event):
                await self._emit(item)
            else:
                await self._write(item)

    async def _next(self, *, draining: bool) -> Watch | _Event | None:
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
            item, wait = self._pop(draining=draining)
            if item is not None:
                self._bucket.take()
                return item
            if draining and not self.pending and not self._inflight:
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

    def _pop(self, *, draining: bool) -> tuple[Watch | _Event | None, float]:
        """The best write now, or how long until a progress write is due."""
        if not self._events.empty() and self._since_event >= EVENT_TURN - 1:
            return self._pop_event(), 0.0
        watch = self._pop_oldest(self._final) or self._pop_oldest(self._urgent)
        if watch is None and not self._events.empty():
            return self._pop_event(), 0.0
        wait = 0.0
        if watch is None:
            watch, wait = self._next_progress(ignore_due=draining)
        if watch is not None:
            self._inflight.add(watch.ref)
            self._since_event += 1
        return watch, wait

    def _pop_event(self) -> _Event:
        self._since_event = 0
        event = self._events.get_nowait()
        self._dropping = self._dropping and not self._events.empty()
        return event

    def _pop_oldest(self, queue: OrderedDict[ObjectRef, Watch]) -> Watch | None:
        """The oldest entry whose object is not being written right now."""
        for ref in queue:
            if ref not in self._inflight:
                return queue.pop(ref)
        return None

    def _next_progress(self, *, ignore_due: bool) -> tuple[Watch | None, float]:
        """The first progress write that is due, or how long until the earliest one is."""
        now = self._clock()
        while self._progress_due:
            due, seq, ref = self._progress_due[0]
            entry = self._progress.get(ref)
            if entry is None or entry[1] != seq:  # written or promoted to urgent since
                heapq.heappop(self._progress_due)
                continue
            if due > now and not ignore_due:
                return None, due - now
            if ref in self._inflight:  # its write ending wakes the waiter
                return None, float("inf")
            heapq.heappop(self._progress_due)
            del self._progress[ref]
            return entry[0], 0.0
        return None, float("inf")

    async def _write(self, watch: Watch) -> None:
        """Writes (the newest state of) a watch `_pop` marked in flight."""
        watch = self._latest.get(watch.ref, watch)
        try:
            if not self._may_write(watch.ref):
                return  # no longer this replica's to write
            await self._write_once(watch)
        except asyncio.CancelledError:
            self._resubmit(watch.ref)  # shutdown: the flush writes it
            raise
        finally:
            self._inflight.discard(watch.ref)
            self._wake.set()
            self._write_ended.set()

    def _resubmit(self, ref: ObjectRef) -> None:
        latest = self._latest.get(ref)
        if latest is not None:  # not forgotten (deleted) meanwhile
            self.submit(latest, urgent=True)

    async def _write_once(self, watch: Watch) -> None:
        ref = watch.ref
        try:
            status = render(watch, self._wall())
        except Exception as exc:  # a bug must not leave the object without any status
            self._metrics.internal_errors.labels("rendering status").inc()
            log.error(
                "status of %s/%s: render failed",
                ref.namespace,
                ref.name,
                exc_info=exc,
                extra=about(ref),
            )
            status = _minimal(watch, exc)
        try:
            texts = _encode(status, encode_json)
        except (TypeError, ValueError) as exc:  # NaN, a non-string key: never retry as is
            status = _without_endpoint_parts(status, f"not encodable as JSON ({exc})")
            texts = _encode(status, _encode_leniently)
            log.error(
                "status of %s/%s was not encodable", ref.namespace, ref.name, extra=about(ref)
            )
        digest = _digest(texts)
        previous = self._written.get(ref)
        if previous is not None and previous.digest == digest:
            self._metrics.status_writes.labels("unchanged").inc()
            return
        changed = _changed(previous.digest, digest) if previous and previous.exact else None
        try:
            exact = await self._send(watch, status, texts, changed)
        except ApiError as exc:
            if exc.gone:
                self._metrics.status_writes.labels("gone").inc()
                return
            self._metrics.status_writes.labels("error").inc()
            log.warning(
                "status write for %s/%s failed: %s", ref.namespace, ref.name, exc, extra=about(ref)
            )
            if exc.retriable:
                await self._retry(watch)
            return
        except Exception as exc:
            self._metrics.status_writes.labels("error").inc()
            log.warning(
                "status write for %s/%s failed: %s",
                ref.namespace,
                ref.name,
                type(exc).__name__,
                extra=about(ref),
            )
            if self._deadline is None:
                await self._retry(watch)
            else:
                self._unanswered()
            return
        self._metrics.status_writes.labels("written").inc()
        self._written[ref] = _Written(digest, self._clock(), exact)

    async def _send(
        self,
        watch: Watch,
        status: dict[str, Any],
        texts: dict[str, str],
        changed: tuple[str, ...] | None,
    ) -> bool:
        """Writes `status`: only the `changed` fields if known, else whole. True when the
        object now holds it, False when it was refused as invalid and written without
        what came from the endpoint instead."""
        ref = watch.ref
        try:
            await self._api.patch_status(ref, EncodedStatus(status, texts, changed))
            return True
        except ApiError as exc:
            if exc.status not in (400, 422):
                raise
            if changed is not None:
                # The fields could not be patched in (the object's status was replaced
                # meanwhile, say, or the new values are refused): the status goes whole.
                return await self._send(watch, status, texts, None)
            if not any(status.get(key) is not None for key in _FROM_ENDPOINT):
                raise
            # Refused as invalid (too large, a value the schema does not take): what
            # came from the endpoint goes, the rest of the status still gets out.
            self._metrics.status_writes.labels("invalid").inc()
            log.warning(
                "status of %s/%s refused (%s); writing it without result and last response",
                ref.namespace,
                ref.name,
                exc,
                extra=about(ref),
            )
            reason = f"refused by the API server (HTTP {exc.status})"
            await self._api.patch_status(ref, _without_endpoint_parts(status, reason))
            return False

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

    async def _emit(self, event: _Event) -> None:
        # Not guarded by `may_write`: an Event records what this replica saw and
        # overwrites nothing of the next holder's.
        try:
            await self._api.create_event(
                event.ref, warning=event.warning, reason=event.reason, message=event.message
            )
        except Exception as exc:
            log.warning(
                "event %s for %s not created: %s",
                event.reason,
                event.ref.name,
                exc,
                extra=about(event.ref),
            )
            if not isinstance(exc, ApiError):
                self._unanswered()
        else:
            self._metrics.events_created.inc()
