"""Publishing watch state: `status` with its conditions, and Events.

The writer is polite to the API server at any fleet size:
- a phase or reason change is queued as urgent and written first;
- a still-pending watch's progress is written at most once per progress
  interval (one object, one write, however often it polls), on a grid so that the
  progress writes of many objects go out together (PROGRESS_GRID_SHARE);
- latest wins: a watch queued twice is written once, with its state at write time;
- a status identical to the one last written is never sent, and a write sends only the
  fields that changed since (a progress write: attempts, poll times, last response);
- all status writes share one token bucket (`JOBWATCH_STATUS_QPS`);
- a write always sends the newest state of its object, a retry included: the queues
  hold the latest `Watch` submitted for each object, never an older one;
- a status the API server cannot take (not encodable, or refused as invalid) is written
  again without its result and last response, saying why, instead of being retried
  forever;
- every status says which replica wrote it (`holder`), every write is fenced by what the
  writer last knew of the stored status (kube.Fence: the API server refuses it if the
  holder or phase changed since), and a refused write reads the object once: an end
  another replica wrote stands, anything else is written over whole (`_refused`);
- whether the object is still this replica's (`may_write`) is asked right before each
  request, status and Event alike: a write that waited must not go out after the
  replica's lease ran out.

Events (EventRecorder): every phase change is an occurrence of a kind, (namespace, type,
reason). Events never delay a status write: they have a token bucket of their own
(`JOBWATCH_EVENT_QPS`, `_BURST`) and one task of their own. (They once shared the status
budget with one token in six: a start-up of 10,000 watches dropped 19,000 of 19,050.)
- While the Event budget has a token for it, an occurrence is an Event of its own about
  its JobWatch, created at once.
- Once it has none, or within EVENT_HOLD after an aggregated Event of the same kind, the
  occurrences of a kind are gathered for EVENT_HOLD seconds into one Event, as
  client-go's EventCorrelator combines similar Events: `count` occurrences,
  `firstTimestamp` the first one's time, about the first one's object, with a message
  naming the time span and a few objects ("and N similar", "combined from similar
  events") before the first one's message. A burst of thousands of phase changes costs
  the burst, then about one Event per kind per EVENT_HOLD.
- None is lost silently: an occurrence is in an Event created (its `count`), or counted
  in `jobwatch_events_dropped_total` (more than MAX_EVENT_KINDS kinds waiting, or its
  Event refused EVENT_TRIES times); `jobwatch_events_aggregated_total` counts those that
  went out inside another's Event.
- Memory is bounded: Events of their own at most one per token, gathered ones one per
  kind (MAX_EVENT_KINDS), each a few names and one message. The kind holds the namespace,
  so an Event never names another namespace's objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import heapq
import json
import logging
import math
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .kube import KubeApi
from .kubeerrors import ApiError
from .logs import about
from .metrics import Metrics
from .policy import END_PHASES, Phase
from .ratelimit import TokenBucket
from .refs import ObjectRef
from .statuspatch import EncodedStatus, Fence, encode_json
from .watch import Watch, format_time, format_time_seconds

log = logging.getLogger(__name__)

_ACTIVE = (Phase.PENDING, Phase.POLLING)
_END_PHASES = frozenset(phase.value for phase in END_PHASES)
_STALLED = (Phase.FAILED, Phase.TIMED_OUT)
RETRY_DELAY = 1.0
# Events (see EventRecorder). Once the Event budget has run out, or right after an
# aggregated Event of the same kind, occurrences are gathered this long into one Event.
EVENT_HOLD = 10.0
# Kinds of Event (namespace, type, reason) waiting at once: beyond, an occurrence is lost
# (counted). Reasons are a fixed vocabulary; namespaces are what can grow.
MAX_EVENT_KINDS = 1000
EVENT_NAMES = 3  # objects an aggregated Event names
EVENT_TRIES = 5  # attempts at creating one Event, RETRY_DELAY doubling in between
MAX_EVENT_MESSAGE = 1024  # what the API client sends of a message
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
    "holder",
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


def render(watch: Watch, now: float, holder: str | None = None) -> dict[str, Any]:
    """The whole `status` for `watch`, written by replica `holder`; a None value means the
    field is absent."""
    phase, (reason, message) = watch.phase, watch.shown
    message = message[:MAX_MESSAGE]
    finished = watch.finished
    conditions = [
        _condition(
            watch, "Ready", true=phase == Phase.SUCCEEDED, reason=reason, message=message, now=now
        ),
        _condition(
            watch, "Reconciling", true=phase in _ACTIVE, reason=reason, message=message, now=now
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
        "holder": holder,
        "conditions": conditions,
    }


def _minimal(watch: Watch, exc: Exception, holder: str) -> dict[str, Any]:
    """What is written when `render` fails: the phase and why the rest is missing."""
    return {
        "phase": watch.phase.value,
        "reason": watch.shown[0],
        "message": f"status could not be rendered ({type(exc).__name__}); "
        "the operator's log has the details",
        "attempts": watch.attempts,
        "observedGeneration": watch.generation,
        "specHash": watch.spec_hash,
        "holder": holder,
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


class _NotOurs(Exception):
    """The object is no longer this replica's to write (StatusWriter's `may_write`)."""


def _end_stands(watch: Watch, stored: object) -> bool:
    """Whether a stored status another writer left is an end that `watch` must not
    undo: an end of the same generation, while `watch` has not ended."""
    if not isinstance(stored, dict) or watch.finished:
        return False
    ended = stored.get("phase") in _END_PHASES
    return ended and stored.get("observedGeneration") == watch.generation


_EventKind = tuple[str, bool, str]  # namespace, warning, reason


@dataclass(slots=True)
class _Pending:
    """One Event to create, standing for `count` similar occurrences: about the first
    one's object, with its message, and naming up to EVENT_NAMES objects."""

    ref: ObjectRef
    message: str
    first: float  # wall clock
    last: float
    due: float  # clock: not created before
    names: dict[str, int]  # named object -> its occurrences here
    count: int = 1
    tries: int = 0

    def absorb(self, other: _Pending) -> None:
        """Folds `other` (similar: of the same kind) into this one."""
        earlier, later = (other, self) if other.first < self.first else (self, other)
        names = dict(earlier.names)
        for name, seen in later.names.items():
            if name in names or len(names) < EVENT_NAMES:
                names[name] = names.get(name, 0) + seen
        self.ref, self.message, self.names = earlier.ref, earlier.message, names
        self.first, self.last = earlier.first, max(self.last, other.last)
        self.count += other.count
        self.tries = max(self.tries, other.tries)

    def message_text(self) -> str:
        if self.count == 1:
            return self.message
        unnamed = self.count - sum(self.names.values())
        named = ", ".join(self.names) + (f" and {unnamed} similar" if unnamed else "")
        return (
            f"{self.count} similar Events from {format_time_seconds(self.first)} to "
            f"{format_time_seconds(self.last)} (combined from similar events): {named}; "
            f"{self.ref.name}: {self.message}"
        )


class EventRecorder:
    """Events within a budget of their own, aggregated instead of dropped (see the module
    docstring)."""

    def __init__(
        self,
        api: KubeApi,
        metrics: Metrics,
        *,
        qps: float,
        burst: int,
        wall: Callable[[], float],
        clock: Callable[[], float],
        may_write: Callable[[ObjectRef], bool] = lambda ref: True,
    ) -> None:
        self._api, self._metrics = api, metrics
        self._wall, self._clock = wall, clock
        self._may_write = may_write  # as for status writes: see StatusWriter
        self._bucket = TokenBucket(qps, burst, clock)
        # Occurrences with a token of their own, oldest first: no more than the tokens.
        self._alone: deque[tuple[_EventKind, _Pending]] = deque()
        self._gathered: dict[_EventKind, _Pending] = {}
        # Kinds that had an aggregated Event lately -> until when theirs are gathered.
        self._busy: dict[_EventKind, float] = {}
        self._wake = asyncio.Event()
        self._overflowing = False
        # Set by drain(): retries must fit in its budget, nothing is attempted after it.
        self._deadline: float | None = None
        self.given_up = 0  # Events drain() gave up on

    @property
    def pending(self) -> int:
        """Events waiting to be created."""
        return len(self._alone) + len(self._gathered)

    def record(self, ref: ObjectRef, *, warning: bool, reason: str, message: str) -> None:
        now, wall = self._clock(), self._wall()
        kind = (ref.namespace, warning, reason)
        occurrence = _Pending(ref, message[:MAX_EVENT_MESSAGE], wall, wall, now, {ref.name: 1})
        gathered = self._gathered.get(kind)
        if gathered is not None:
            gathered.absorb(occurrence)
        elif self._busy.get(kind, -math.inf) <= now and self._bucket.available() >= (
            len(self._alone) + 1
        ):
            self._alone.append((kind, occurrence))
        elif len(self._gathered) < MAX_EVENT_KINDS:
            occurrence.due = now + EVENT_HOLD
            self._gathered[kind] = occurrence
            self._overflowing = False
        else:
            if not self._overflowing:  # once per overflow, not once per occurrence
                log.warning("%d kinds of Event waiting: dropping Events", MAX_EVENT_KINDS)
            self._overflowing = True
            self._metrics.events_dropped.inc()
            return
        self._wake.set()

    async def run(self) -> None:
        await self._send(draining=False)

    async def drain(self, deadline: float) -> None:
        """Creates every Event waiting, gathered or not, until `deadline` (clock)."""
        self._deadline, self.given_up = deadline, 0
        self._wake.set()  # a run() still going keeps to the deadline too
        await self._send(draining=True)

    def _next(self, *, draining: bool) -> tuple[tuple[_EventKind, _Pending] | None, float]:
        """The Event to create now, or how long until one is due: those of their own
        first, then the gathered one due first (a pass over at most MAX_EVENT_KINDS, once
        per Event created). Draining, a gathered Event is due at once, unless it waits to
        be tried again."""

        def due(kind: _EventKind) -> float:
            pending = self._gathered[kind]
            return pending.due if pending.tries or not draining else -math.inf

        if self._alone:
            return self._alone.popleft(), 0.0
        kind = min(self._gathered, key=due, default=None)
        if kind is None:
            return None, math.inf
        now = self._clock()
        wait = due(kind) - now
        if wait > 0:
            return None, wait
        pending = self._gathered.pop(kind)
        if pending.count > 1:
            # From now, not from when it is created: what comes meanwhile is gathered too.
            self._busy = {k: until for k, until in self._busy.items() if until > now}
            self._busy[kind] = now + EVENT_HOLD
        return (kind, pending), 0.0

    async def _send(self, *, draining: bool) -> None:
        while self._deadline is None or self._clock() < self._deadline:
            delay = self._bucket.delay()
            if self._deadline is not None and self._clock() + delay >= self._deadline:
                return  # no token before the end: what is left is logged as unsent
            if delay:
                await asyncio.sleep(delay)  # what comes meanwhile is gathered
                continue
            self._wake.clear()
            event, wait = self._next(draining=draining)
            if event is not None:
                self._bucket.take()
                await self._create(*event)
            elif draining and not self._gathered:
                return
            else:
                if self._deadline is not None:
                    wait = min(wait, self._deadline - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if wait == math.inf else wait):
                        await self._wake.wait()

    async def _create(self, kind: _EventKind, pending: _Pending) -> None:
        ref, warning, reason = pending.ref, kind[1], kind[2]
        if not self._may_write(ref):
            # Asked at the moment of sending, as for status: a replica that lost the
            # object (its lease ran out while this waited) must not report on it.
            self._metrics.events_dropped.inc(pending.count)
            return
        try:
            await self._api.create_event(
                ref,
                warning=warning,
                reason=reason,
                message=pending.message_text(),
                count=pending.count,
                first_seen=datetime.datetime.fromtimestamp(pending.first, datetime.UTC),
            )
        except asyncio.CancelledError:
            self._put_back(kind, pending, self._clock())  # shutdown: drain() sends it
            raise
        except Exception as exc:
            answered = isinstance(exc, ApiError)
            retriable = not isinstance(exc, ApiError) or exc.retriable
            log.warning(
                "Event %s for %s/%s not created: %s",
                reason,
                ref.namespace,
                ref.name,
                exc if answered else type(exc).__name__,
                extra=about(ref),
            )
            now = self._clock()
            if not answered and self._deadline is not None:
                # At shutdown with no answer: every request left would fail alike.
                self._deadline = min(self._deadline, now)
            retry_at = now + RETRY_DELAY * 2**pending.tries
            pending.tries += 1
            if (
                retriable
                and pending.tries < EVENT_TRIES
                and (self._deadline is None or retry_at < self._deadline)
            ):
                self._put_back(kind, pending, retry_at)
                return
            self._metrics.events_dropped.inc(pending.count)
            if self._deadline is not None:
                self.given_up += 1
            return
        self._metrics.events_created.inc()
        if pending.count > 1:
            self._metrics.events_aggregated.inc(pending.count - 1)

    def _put_back(self, kind: _EventKind, pending: _Pending, due: float) -> None:
        """An Event not created waits again, with what was gathered of its kind since."""
        newer = self._gathered.get(kind)
        if newer is not None:
            pending.absorb(newer)
        pending.due = due
        self._gathered[kind] = pending
        self._wake.set()


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
        self._api, self._metrics = api, metrics
        # With replicas: is the object's bucket still this one's? A replica that lost it
        # (renew deadline passed, taken over) must not overwrite the new holder's status.
        # Asked right before each request: a write waits for a token, a retry, an answer.
        self._may_write = may_write
        # Called with the object as stored when a write was refused because another
        # replica ended the watch meanwhile: the end stands, the caller takes it in.
        self._on_foreign_end = on_foreign_end
        # Every status written says who wrote it (`status.holder`), and every write tests
        # that the object still holds what this writer last knew of it (see Fence): the
        # fence a write of each phase leaves, one object for all the objects.
        self._identity = identity
        self._own = {phase.value: Fence(True, identity, phase.value) for phase in Phase}
        self._fences: dict[ObjectRef, Fence] = {}
        self._repairs: set[ObjectRef] = set()  # rewritten whole after a refusal
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
        self._events = EventRecorder(
            api,
            metrics,
            qps=event_qps,
            burst=event_burst,
            wall=wall,
            clock=clock,
            may_write=may_write,
        )
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
        """Records an Event for the watch's current phase; reason = the status reason."""
        reason, message = watch.shown
        self._events.record(
            watch.ref, warning=watch.phase in _STALLED, reason=reason, message=message
        )

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

    def stored(self, ref: ObjectRef, status: object) -> None:
        """The object's `status` as taken in (None: it has none): what its first write
        expects to find. This writer's own writes since know better and are kept."""
        self._fences.setdefault(ref, Fence.of(status))

    def forget(self, ref: ObjectRef) -> None:
        self._unqueue(ref)
        self._written.pop(ref, None)
        self._latest.pop(ref, None)
        self._fences.pop(ref, None)
        self._repairs.discard(ref)

    def _unqueue(self, ref: ObjectRef) -> None:
        self._final.pop(ref, None)
        self._urgent.pop(ref, None)
        self._progress.pop(ref, None)

    @property
    def pending(self) -> int:
        """Status writes queued."""
        return len(self._final) + len(self._urgent) + len(self._progress)

    def backlog(self) -> dict[str, int]:
        """What is queued, by kind (`jobwatch_status_backlog`)."""
        return {
            "final": len(self._final),
            "urgent": len(self._urgent),
            "progress": len(self._progress),
            "events": self._events.pending,
        }

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

    def _pop(self, *, draining: bool) -> tuple[Watch | None, float]:
        """The best write now, or how long until a progress write is due."""
        watch = self._pop_oldest(self._final) or self._pop_oldest(self._urgent)
        wait = 0.0
        if watch is None:
            watch, wait = self._next_progress(ignore_due=draining)
        if watch is not None:
            self._inflight.add(watch.ref)
        return watch, wait

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

    def _render(self, watch: Watch) -> tuple[dict[str, Any], dict[str, str]]:
        """The status to write for `watch`, and the JSON text of each field."""
        ref = watch.ref
        try:
            status = render(watch, self._wall(), self._identity)
        except Exception as exc:  # a bug must not leave the object without any status
            self._metrics.internal_errors.labels("rendering status").inc()
            log.error(
                "status of %s/%s: render failed",
                ref.namespace,
                ref.name,
                exc_info=exc,
                extra=about(ref),
            )
            status = _minimal(watch, exc, self._identity)
        try:
            return status, _encode(status, encode_json)
        except (TypeError, ValueError) as exc:  # NaN, a non-string key: never retry as is
            status = _without_endpoint_parts(status, f"not encodable as JSON ({exc})")
            log.error(
                "status of %s/%s was not encodable", ref.namespace, ref.name, extra=about(ref)
            )
            return status, _encode(status, _encode_leniently)

    async def _write_once(self, watch: Watch) -> None:
        ref = watch.ref
        status, texts = self._render(watch)
        digest = _digest(texts)
        previous = self._written.get(ref)
        if previous is not None and previous.digest == digest:
            self._metrics.status_writes.labels("unchanged").inc()
            return
        changed = _changed(previous.digest, digest) if previous and previous.exact else None
        try:
            exact = await self._send(watch, status, texts, changed)
        except _NotOurs:
            # Its queued writes go; what is known of the object stays, for a bucket that
            # lapsed and comes back (the runtime submits its watches again then).
            self._metrics.status_writes.labels("not_ours").inc()
            self._unqueue(ref)
            return
        except ApiError as exc:
            if exc.gone:
                self._metrics.status_writes.labels("gone").inc()
                return
            if exc.not_applied:
                await self._refused(watch)
                return
            self._metrics.status_writes.labels("error").inc()
            log.warning(
                "status write for %s/%s failed: %s", ref.namespace, ref.name, exc, extra=about(ref)
            )
            if exc.retriable:
                await self._retry(watch)
            return
        except Exception as exc:
            # No answer: the write may have been applied. The fence stays as it was; if
            # it was applied, the next write is refused and reads what the object holds.
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
        repaired = ref in self._repairs
        self._repairs.discard(ref)
        self._metrics.status_writes.labels("repaired" if repaired else "written").inc()
        if ref in self._latest:  # not forgotten while the write was out
            self._written[ref] = _Written(digest, self._clock(), exact)
            phase = str(status["phase"])
            self._fences[ref] = self._own.get(phase) or Fence(True, self._identity, phase)

    async def _patch(self, ref: ObjectRef, status: dict[str, Any]) -> None:
        """One PATCH of `status`, fenced; raises _NotOurs instead when the object is no
        longer this replica's to write at this very moment."""
        if not self._may_write(ref):
            raise _NotOurs
        await self._api.patch_status(ref, status, self._fences.get(ref))

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
            await self._patch(ref, EncodedStatus(status, texts, changed))
            return True
        except ApiError as exc:
            if exc.status not in (400, 422) or exc.not_applied:
                raise  # a fence refusal: _refused reads what the object holds
            if changed is not None:
                # The new values are refused as fields (they may be fine as a whole
                # status): the status goes whole.
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
            await self._patch(ref, _without_endpoint_parts(status, reason))
            return False

    async def _refused(self, watch: Watch) -> None:
        """A write refused by its fence: someone else wrote the object's status since
        this writer last knew it (another replica, or this one's own write whose answer
        was lost). One GET says what it holds. An end of this generation stands when
        ours is not an end: the watch is handed back to the runtime, which takes it in
        as finished. Anything else is written over, whole, after the retry delay and
        with a token like any write, so that two writers fighting cannot spin."""
        ref = watch.ref
        self._metrics.status_writes.labels("refused").inc()
        try:
            body = await self._api.get_jobwatch(ref)
        except Exception as exc:
            log.warning(
                "status write for %s/%s refused, and reading the object failed: %s",
                ref.namespace,
                ref.name,
                exc if isinstance(exc, ApiError) else type(exc).__name__,
                extra=about(ref),
            )
            await self._retry(watch)  # refused again, it reads again
            return
        if body is None:
            log.warning(
                "status write for %s/%s refused: the object is gone",
                ref.namespace,
                ref.name,
                extra=about(ref),
            )
            return
        stored = body.get("status")
        theirs = Fence.of(stored)
        stands = _end_stands(watch, stored)
        log.warning(
            "status write for %s/%s refused: its status was written meanwhile by %s (phase %s)%s",
            ref.namespace,
            ref.name,
            theirs.holder or "an unknown writer",
            theirs.phase,
            "; that end stands" if stands else "; writing ours again, whole",
            extra=about(ref),
        )
        if stands:
            self.forget(ref)
            self._on_foreign_end(body)
            return
        if ref not in self._latest:
            return  # forgotten while the GET was out
        self._fences[ref] = theirs
        self._written.pop(ref, None)  # what the object holds is not ours: the next is whole
        self._repairs.add(ref)
        await self._retry(watch)

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
