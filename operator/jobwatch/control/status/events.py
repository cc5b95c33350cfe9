"""Events (layer: control): a JobWatch's phase changes as Kubernetes Events, within a
budget of their own and aggregated instead of dropped.

Every phase change is an occurrence of a kind, (namespace, type, reason). Events never
delay a status write: they have a token bucket of their own (`JOBWATCH_EVENT_QPS`,
`_BURST`) and one task of their own. (They once shared the status budget, one token
in six: a start-up burst then dropped nearly all of its Events.)
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
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import format_time_seconds
from jobwatch.kits.logs import about
from jobwatch.kits.metrics import Metrics
from jobwatch.kits.ratelimit import TokenBucket
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError

log = logging.getLogger(__name__)

# Before an Event not created is tried again, doubling with each try.
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
        self._may_write = may_write  # as for status writes: see writer.py
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
