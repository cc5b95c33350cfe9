"""The watches this replica has, and the one way each is planned, recorded, ended and
forgotten: the state the intake, the handover and the poll pipeline share.

Layer: control.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from jobwatch.control.hostwaits import HostWaits, Key
from jobwatch.control.scheduler import Scheduler
from jobwatch.control.status.writer import StatusWriter
from jobwatch.core import policy
from jobwatch.core.expressions import final_result
from jobwatch.core.outcome import Response
from jobwatch.core.policy import Decision, ErrorClass, LastError, Phase
from jobwatch.core.watch import Watch
from jobwatch.jobservice.hosts import HeldReason
from jobwatch.kits.logs import about
from jobwatch.kits.metrics import Metrics

# The polling side's log lines keep the logger name they have always had, whichever of
# its modules writes them: users filter on it, and the JSON log test finds the ends there.
log = logging.getLogger("jobwatch.control.runtime")

# A timer that fires a hair early must not poll just before the deadline with
# a request timeout of a few milliseconds: aim just past it instead.
DEADLINE_SLACK = 0.005
# How fast the polls already due when polling starts are sent: about half of what one
# process sustains, so the first round never queues behind itself.
START_UP_POLLS_PER_SECOND = 1000.0
# The reasons of a watch whose poll could not go out: at the deadline, its message says why.
NOT_SENT_REASONS = frozenset({"SecretNotFound", "SecretNotAllowed", *HeldReason})


class WatchBook:
    def __init__(
        self,
        scheduler: Scheduler[Key],
        writer: StatusWriter,
        metrics: Metrics,
        waits: HostWaits,
        *,
        wall: Callable[[], float],
        clock: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        self.watches: dict[Key, Watch] = {}
        self.scheduler, self.writer, self.waits = scheduler, writer, waits
        self.wall, self.clock, self.rand = wall, clock, rand
        self._metrics = metrics
        self.polling = False  # the scheduler runs: polls due already are paced
        self._next_slot = 0.0  # wall clock: see `paced`

    def forget(self, key: Key) -> None:
        self.waits.forget(key)
        watch = self.watches.pop(key, None)
        if watch is not None:
            self.scheduler.cancel(key)
            self.writer.forget(watch.ref)

    def plan(self, key: Key, watch: Watch, due_wall: float) -> None:
        """Plans the next poll. The one place that keeps the timing floor: whatever asked
        for it (a decision, a resume, an edit, a restart), no request starts sooner than
        `policy.min_gap` after the watch's last one ended, nor before `not_before` (one
        another replica may still have open). Only the deadline comes sooner (no request
        is sent at it)."""
        if watch.spec is not None and watch.last_end is not None:
            due_wall = max(due_wall, watch.last_end + policy.min_gap(watch.spec))
        if watch.not_before is not None:
            due_wall = max(due_wall, watch.not_before)
        due_wall = min(due_wall, watch.deadline + DEADLINE_SLACK)
        watch.next_poll_time = due_wall
        self._schedule_at(key, due_wall)

    def plan_deletion(self, key: Key, due_wall: float) -> None:
        """Plans the run that deletes a finished watch (`spec.ttlSecondsAfterFinished`,
        control/reaper.py) at `due_wall`: the key's one scheduler entry, as a poll is for
        a watch that has not ended. A time already past runs at once."""
        self._schedule_at(key, due_wall)

    def _schedule_at(self, key: Key, due_wall: float) -> None:
        # Times are planned on the wall clock (status holds them) but run on the
        # monotonic one, which a clock step cannot move.
        delay = max(0.0, due_wall - self.wall())
        self.scheduler.schedule(key, self.clock() + delay)

    def paced(self, due: float, watch: Watch) -> float:
        """`due`, or for a poll due already once polling runs (a bucket taken over, a burst
        of new JobWatches) the next slot at START_UP_POLLS_PER_SECOND, within the watch's
        own interval: the spread `Runtime.start_polling` gives the fleet at start-up."""
        now = self.wall()
        if not self.polling or due > now or watch.spec is None:
            return due
        self._next_slot = max(self._next_slot, now) + 1 / START_UP_POLLS_PER_SECOND
        return min(self._next_slot, now + watch.spec.interval)

    def apply(
        self,
        key: Key,
        watch: Watch,
        decision: Decision,
        now: float,
        response: Response | None = None,
    ) -> None:
        """`response`: the one this decision was made on, if any (see `finish`)."""
        self._metrics.polls.labels(decision.reason).inc()
        if decision.finished:
            self.finish(watch, decision, now, response)
            return
        # `waiting` keeps the phase it is given; any attempt made means Polling.
        phase = (
            Phase.POLLING if decision.phase == Phase.PENDING and watch.attempts else decision.phase
        )
        changed = (watch.phase, watch.reason) != (phase, decision.reason)
        phase_changed = watch.phase != phase
        watch.phase, watch.reason, watch.message = phase, decision.reason, decision.message
        watch.consecutive_errors = decision.consecutive_errors
        watch.last_error = decision.error
        self.plan(key, watch, now + (decision.delay or 0.0))
        self.writer.submit(watch, urgent=changed)
        if phase_changed:
            self.writer.event(watch)

    def time_out(self, watch: Watch, now: float, cut_after: float | None = None) -> None:
        """`cut_after`: the deadline cut the last request, which had that long; it was an
        attempt, so it counts in the polls metric."""
        not_sent = cut_after is None and watch.reason in NOT_SENT_REASONS
        decision = policy.deadline_exceeded(
            watch.attempts,
            watch.consecutive_errors,
            watch.last_error,
            suspended=watch.suspended,
            not_sent=watch.message if not_sent else None,
            cut_after=cut_after,
        )
        if cut_after is not None:
            self._metrics.polls.labels(decision.reason).inc()
        self.finish(watch, decision, now)

    def finish(
        self, watch: Watch, decision: Decision, now: float, response: Response | None = None
    ) -> None:
        """Ends the watch. `result` is evaluated on the deciding `response` whatever its
        size within the body cap; without one (a later error, the deadline), on the last
        response kept in memory."""
        watch.phase, watch.reason, watch.message = decision.phase, decision.reason, decision.message
        watch.consecutive_errors = decision.consecutive_errors
        watch.last_error = decision.error
        watch.completion_time = now
        watch.next_poll_time = None
        if watch.compiled is not None:
            try:
                watch.result, omitted = final_result(watch.compiled, response or watch.response)
            except Exception as exc:  # the end stands; only the result is lost
                log.error(
                    "%s/%s: result failed",
                    watch.ref.namespace,
                    watch.ref.name,
                    exc_info=exc,
                    extra=about(watch.ref),
                )
                self._metrics.internal_errors.labels("evaluating the result").inc()
                watch.result, omitted = None, f"result not evaluated ({type(exc).__name__})"
            if omitted:
                watch.message = f"{watch.message}; {omitted}"
        watch.response = None
        self.scheduler.cancel((watch.ref.namespace, watch.ref.name))
        self.writer.submit(watch, urgent=True)
        self.writer.event(watch)
        log.info(
            "%s/%s %s: %s",
            watch.ref.namespace,
            watch.ref.name,
            watch.phase,
            watch.message,
            extra=about(watch.ref),
        )

    def fault(self, key: Key, watch: Watch, stage: str, exc: Exception) -> None:
        """An unexpected exception while polling `watch`: its `Internal` error."""
        self._metrics.internal_errors.labels(stage).inc()
        log.error(
            "%s/%s: internal error while %s",
            watch.ref.namespace,
            watch.ref.name,
            stage,
            exc_info=exc,
            extra=about(watch.ref),
        )
        if self.watches.get(key) is not watch or watch.spec is None:
            return
        now = self.wall()
        try:
            if watch.finished:  # it failed while ending: make sure the end is written
                self.writer.submit(watch, urgent=True)
                return
            if policy.timed_out(now, watch.deadline):  # a fault never outlives the deadline
                self.time_out(watch, now)
                return
            message = (
                f"internal error while {stage} ({type(exc).__name__}); "
                "the operator's log has the details"
            )
            decision = policy.error(
                watch.spec,
                watch.consecutive_errors,
                "InternalError",
                LastError(ErrorClass.INTERNAL, message),
                now=now,
                deadline=watch.deadline,
                rand=self.rand,
            )
            self.apply(key, watch, decision, now)
        except Exception:
            # Not even the error could be recorded: keep the watch alive at least, so
            # that the deadline (checked first at every poll) still ends it.
            log.exception(
                "%s/%s: recording the error failed",
                watch.ref.namespace,
                key[1],
                extra=about(watch.ref),
            )
            self.scheduler.schedule(key, self.clock() + max(watch.spec.interval, 1.0))
