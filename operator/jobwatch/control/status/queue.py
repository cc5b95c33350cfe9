"""The status writes waiting (layer: control): ends first, then phase and reason
changes, then progress on a grid; which objects are being written.

- a phase or reason change is urgent, an end more urgent still; a still-pending watch's
  progress falls due one progress interval after its object's last write, rounded up to
  a grid so that the progress writes of many objects go out together;
- latest wins: an object queued twice is queued once, in its most urgent queue, with
  the newest `Watch` submitted for it;
- one object is never written twice at once: what is in flight waits in its queue.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable

from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch

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


class WriteQueue:
    """The queues of one status writer, and the objects it is writing (`inflight`)."""

    def __init__(self, *, qps: float, progress_interval: float, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._progress_interval = progress_interval
        self._grid = min(MAX_PROGRESS_GRID, progress_interval * PROGRESS_GRID_SHARE)
        self._step_room = max(1, int(qps * self._grid))
        self._steps: dict[int, int] = {}  # grid step -> progress writes planned in it
        # Ends first: a finished watch is what `kubectl wait` and pipelines wait for,
        # and during a burst (thousands of new watches) it must not queue behind
        # Pending -> Polling transitions.
        self._final: OrderedDict[ObjectRef, Watch] = OrderedDict()
        self._urgent: OrderedDict[ObjectRef, Watch] = OrderedDict()
        # progress writes: ref -> (watch, sequence), and a heap of when each is due
        self._progress: dict[ObjectRef, tuple[Watch, int]] = {}
        self._progress_due: list[tuple[float, int, ObjectRef]] = []
        self._seq = 0
        self.inflight: set[ObjectRef] = set()

    def put(self, watch: Watch, *, urgent: bool, written_at: float | None) -> bool:
        """Queues a write of `watch` (`written_at`: when its object was last written, if
        ever); True when the writers are to look again (the queues' head changed)."""
        ref = watch.ref
        if urgent:
            self._progress.pop(ref, None)
            if ref in self._final or watch.finished:
                self._urgent.pop(ref, None)
                self._final[ref] = watch  # latest wins, also over a re-run's new state
            else:
                self._urgent[ref] = watch
            return True
        if ref in self._urgent or ref in self._final or ref in self._progress:
            return False
        now = self._clock()
        due = written_at + self._progress_interval if written_at is not None else now
        if self._grid > 0 and due > now:
            due = self._step(due, now)
        self._seq += 1
        self._progress[ref] = (watch, self._seq)
        heapq.heappush(self._progress_due, (due, self._seq, ref))
        return self._progress_due[0][1] == self._seq  # the new earliest: re-arm the wait

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

    def remove(self, ref: ObjectRef) -> None:
        self._final.pop(ref, None)
        self._urgent.pop(ref, None)
        self._progress.pop(ref, None)

    def busy(self, ref: ObjectRef) -> bool:
        """Whether the object has a phase or reason change queued or a write in flight."""
        return ref in self._final or ref in self._urgent or ref in self.inflight

    @property
    def pending(self) -> int:
        """Status writes queued."""
        return len(self._final) + len(self._urgent) + len(self._progress)

    def sizes(self) -> dict[str, int]:
        """What is queued, by kind."""
        return {
            "final": len(self._final),
            "urgent": len(self._urgent),
            "progress": len(self._progress),
        }

    def pop(self, *, draining: bool) -> tuple[Watch | None, float]:
        """The best write now, marked in flight, or how long until a progress write is
        due."""
        watch = self._pop_oldest(self._final) or self._pop_oldest(self._urgent)
        wait = 0.0
        if watch is None:
            watch, wait = self._next_progress(ignore_due=draining)
        if watch is not None:
            self.inflight.add(watch.ref)
        return watch, wait

    def _pop_oldest(self, queue: OrderedDict[ObjectRef, Watch]) -> Watch | None:
        """The oldest entry whose object is not being written right now."""
        for ref in queue:
            if ref not in self.inflight:
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
            if ref in self.inflight:  # its write ending wakes the waiter
                return None, float("inf")
            heapq.heappop(self._progress_due)
            del self._progress[ref]
            return entry[0], 0.0
        return None, float("inf")
