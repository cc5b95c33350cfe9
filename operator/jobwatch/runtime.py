"""Turns watch events into watches, and runs one poll of a watch.

This is where the pieces meet: the spec, the policy, the HTTP client, the
scheduler and the status writer. The decisions themselves are in policy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import policy
from .adoption import Adoption
from .config import Config
from .expressions import CompiledWatch, ExpressionError, final_result
from .handover import Handed
from .hosts import Held, HeldReason, HostKey, Hosts, Verdict, host_key, verdict
from .httpclient import HttpClient, Request, TLSSettings
from .kube import KubeApi, ObjectRef
from .logs import about
from .metrics import FleetFigures, HostFigures, Metrics
from .outcome import Outcome, Response
from .ownership import Ownership
from .policy import Decision, ErrorClass, LastError, Phase
from .scheduler import Scheduler
from .secrets import SecretCache, SecretUnavailable
from .spec import SpecError, WatchSpec, parse_spec, spec_digest
from .status import StatusWriter
from .watch import Watch

log = logging.getLogger(__name__)

ALLOW_LABEL = "jobwatch.dev/allow-use"
# A timer that fires a hair early must not poll just before the deadline with
# a request timeout of a few milliseconds: aim just past it instead.
DEADLINE_SLACK = 0.005
# A poll released this much before its floor (the scheduler releases up to EARLY early)
# still goes: re-planning it would only spin.
FLOOR_SLACK = 0.002
# How fast the polls already due when polling starts are sent: about half of what one
# process sustains, so the first round never queues behind itself.
START_UP_POLLS_PER_SECOND = 1000.0
# The reasons of a watch whose poll could not go out: at the deadline, its message says why.
NOT_SENT_REASONS = frozenset({"SecretNotFound", "SecretNotAllowed", *HeldReason})
# How long a handover waits for the polls it cut to unwind (a cut is immediate).
CUT_WAIT = 1.0


class SecretProblem(Exception):
    """The Secret is missing or not allowed: the watch waits for it (no error counted)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Runtime:
    def __init__(
        self,
        config: Config,
        api: KubeApi,
        http: HttpClient,
        metrics: Metrics,
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        ownership: Ownership | None = None,
    ) -> None:
        self._api, self._http, self._metrics = api, http, metrics
        # With replicas sharing the fleet: the watches of the buckets this one holds.
        # None: a single replica, which takes in and polls every JobWatch it sees.
        self._ownership = ownership
        self.adoption = (
            Adoption(ownership, api.read_jobwatch, self._take_in_adopted)
            if ownership is not None
            else None
        )
        self._wall, self._clock, self._rand = wall, clock, rand
        self.watches: dict[tuple[str, str], Watch] = {}
        self.writer = StatusWriter(
            api,
            metrics,
            qps=config.status_qps,
            burst=config.status_burst,
            event_qps=config.event_qps,
            event_burst=config.event_burst,
            progress_interval=config.progress_interval,
            wall=wall,
            clock=clock,
            identity=config.leases.identity if config.leases else config.identity,
            may_write=self._writable,
            on_foreign_end=self._ended_elsewhere,
        )
        self.scheduler: Scheduler[tuple[str, str]] = Scheduler(
            self.poll, workers=config.max_in_flight, metrics=metrics, clock=clock
        )
        metrics.internals.scheduler_entries = lambda: self.scheduler.entries
        metrics.fleet.source = self._fleet_figures
        # Breaker, in-flight limit, rate cap and Retry-After hold per job service host.
        self._hosts = Hosts(config.hosts, rand)
        # Watches waiting on a rate-limit slot their host reserved for them.
        self._reserved: set[tuple[str, str]] = set()
        # Watches whose poll their host's limits hold back: since when and the poll that
        # hold planned (wall clock), and the host. How late the limits made it is counted
        # when it goes out.
        self._held_back: dict[tuple[str, str], tuple[float, float, HostKey]] = {}
        # Of those, the ones waiting for a slot in flight, per host, first come first: one
        # goes as soon as a request to the host ends, as a due poll takes a free worker
        # (the hold's own time, up to a second away, is only the fallback).
        self._waiting: dict[HostKey, dict[tuple[str, str], None]] = {}
        metrics.hosts.source = self._host_figures
        self._writer_task: asyncio.Task[None] | None = None
        self._polling = False  # start_polling ran
        self._next_slot = 0.0  # wall clock: see `_paced`
        # Reads of the Secrets that headers and CA bundles refer to: shared by every
        # watch that uses the same Secret, inside a fleet-wide budget of API reads.
        self._secrets = SecretCache(
            api,
            ttl=config.secret_ttl,
            missing_ttl=min(config.secret_ttl, 5.0),
            reads_per_second=config.secret_qps,
            burst=config.secret_burst,
            clock=clock,
        )

    def start(self) -> None:
        """Starts publishing status. Polls wait for `start_polling`."""
        self._writer_task = asyncio.create_task(self.writer.run(), name="jobwatch-status-writer")

    def _fleet_figures(self) -> FleetFigures:
        now = self._wall()
        by_phase = dict.fromkeys((phase.value for phase in Phase), 0)
        overrun = 0.0
        for watch in self.watches.values():
            by_phase[watch.phase.value] += 1
            if not watch.finished and now > watch.deadline:
                overrun = max(overrun, now - watch.deadline)
        return FleetFigures(by_phase, overrun)

    def _host_figures(self) -> HostFigures:
        hosts = self._hosts
        held = {str(r): n for r, n in hosts.held.items()}
        return HostFigures(hosts.states(), held, len(hosts), hosts.delays())

    @property
    def writer_stopped(self) -> bool:
        """The status writer ended before shutdown (it only ends by cancellation)."""
        task = self._writer_task
        return task is not None and task.done()

    def start_polling(self) -> None:
        """Starts the scheduler, after spreading the polls that are due already.

        At start-up every watch never polled (or due while the operator was down) is due
        at once: 10k requests in one burst, at the job services and at this process's
        event loop. They are spread at up to START_UP_POLLS_PER_SECOND instead, each
        within its own interval.
        """
        now = self._wall()
        due = [
            (key, watch)
            for key, watch in self.watches.items()
            if watch.spec is not None
            and watch.next_poll_time is not None
            and watch.next_poll_time <= now
        ]
        spread = len(due) / START_UP_POLLS_PER_SECOND
        for key, watch in due:
            assert watch.spec is not None
            self._plan(key, watch, now + self._rand() * min(spread, watch.spec.interval))
        self._polling = True
        self.scheduler.start()

    async def stop_polling(self) -> None:
        """Cancels the polls in flight and plans no more. Interrupted watches stay Polling."""
        await self.scheduler.stop()

    async def shutdown(self, budget: float) -> None:
        """Stops polling and flushes status within `budget` seconds."""
        await self.stop_polling()
        if self.adoption is not None:
            await self.adoption.aclose()
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        await self.writer.flush(budget)

    # --- watch events ------------------------------------------------------

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Takes one watch event of a JobWatch. Cheap: our own status echoes end early.

        Never raises: an object that cannot be taken in must not stop the informer (it
        would replay the event forever, or never finish its listing, and so blind the
        operator for every other JobWatch). It is that object's error instead.
        """
        try:
            self._observe(event_type, body)
        except Exception as exc:
            self._adoption_fault(body, exc)

    def _observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if self.adoption is not None and not self.adoption.note(event_type, key, body):
            return  # another replica's, or being read for an adoption
        self._take_in(event_type, key, meta, body)

    def _take_in_adopted(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """An object read (or an event held) for an adoption: taken in like an event."""
        try:
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            self._take_in(event_type, key, meta, body)
        except Exception as exc:
            self._adoption_fault(body, exc)

    def _take_in(
        self,
        event_type: str | None,
        key: tuple[str, str],
        meta: Mapping[str, Any],
        body: Mapping[str, Any],
    ) -> None:
        current = self.watches.get(key)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self._forget(key)
            return
        generation = int(meta.get("generation") or 0)
        uid = str(meta.get("uid"))
        if current is not None and current.ref.uid == uid and current.generation >= generation:
            return  # our own status echo, or an event older than what was read
        if current is not None and current.ref.uid != uid:
            self._forget(key)
            current = None
        self._adopt(key, ObjectRef(key[0], key[1], uid), generation, body, current)

    def _adoption_fault(self, body: Mapping[str, Any], exc: Exception) -> None:
        """What is left when taking in an object failed: the watch ends `Failed` with
        reason `InternalError` and says so (an edit of its spec tries again)."""
        self._metrics.internal_errors.labels("adopting").inc()
        meta = body.get("metadata") if isinstance(body, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        namespace, name, uid = (str(meta.get(k)) for k in ("namespace", "name", "uid"))
        log.error(
            "%s/%s could not be taken in",
            namespace,
            name,
            exc_info=exc,
            extra=about(ObjectRef(namespace, name, uid)),
        )
        try:
            key = (namespace, name)
            self._forget(key)
            generation = int(meta.get("generation") or 0)
            now = self._wall()
            watch = Watch(
                ref=ObjectRef(namespace, name, uid),
                generation=generation,
                spec_hash=f"internal:{generation}",
                spec=None,
                compiled=None,
                suspended=False,
                start_time=now,
                deadline=now,
            )
            self.watches[key] = watch
            message = (
                f"the operator could not take this JobWatch in ({type(exc).__name__}); "
                "its log has the details; an edit of the spec tries again"
            )
            self._finish(watch, policy.internal_failure(message), now)
        except Exception:
            log.exception(
                "%s/%s: its error could not be recorded either",
                namespace,
                name,
                extra=about(ObjectRef(namespace, name, uid)),
            )

    def keep_only(self, namespace: str | None, keys: set[tuple[str, str]]) -> None:
        """After a fresh list of `namespace` (None: all): forgets the watches not in it,
        deleted while no watch stream was open."""
        gone = [
            key
            for key in self.watches
            if (namespace is None or key[0] == namespace) and key not in keys
        ]
        for key in gone:
            self._forget(key)
        if self.adoption is not None:
            self.adoption.keep_only(namespace, keys)

    def _writable(self, ref: ObjectRef) -> bool:
        ownership = self._ownership
        return ownership is None or ownership.writable(ref.namespace, ref.name, self._clock())

    def _ours(self, key: tuple[str, str]) -> bool:
        """Still this replica's to poll? Checked before anything is sent or written: a
        replica that could not renew its bucket's Lease in time (the API server away, the
        process stopped for a while) drops the watch before another may take it."""
        ownership = self._ownership
        now = self._clock()
        if ownership is None or ownership.valid(key[0], key[1], now):
            return True
        if ownership.kept(key[0], key[1], now):
            return False  # parked: `resume` plans its polls again, `drop` forgets it
        if not ownership.writable(key[0], key[1], now):
            self._forget(key)
        return False  # being handed over: `hand_over` writes its status, then forgets it

    def drop(self, buckets: frozenset[int]) -> None:
        """Lost buckets: forget their watches at once; nothing more is written for them
        (their new holder adopts them from what was)."""
        ownership = self._ownership
        assert ownership is not None and self.adoption is not None
        self.adoption.stop(buckets)
        for key in [k for k in self.watches if ownership.bucket(*k) in buckets]:
            self._forget(key)

    def resume(self, buckets: frozenset[int]) -> None:
        """Parked buckets are this replica's again, nobody else's in between: their
        watches, as they were, poll again (those due meanwhile paced), and what could
        not be written meanwhile is written."""
        ownership = self._ownership
        assert ownership is not None
        now = self._wall()
        for key, watch in self.watches.items():
            if ownership.bucket(*key) not in buckets:
                continue
            # What could not be written while parked (an end above all) goes out now.
            self.writer.submit(watch, urgent=True)
            if not watch.finished and watch.spec:
                due = (
                    watch.deadline
                    if watch.suspended
                    else self._paced(watch.next_poll_time or now, watch)
                )
                self._plan(key, watch, due)

    async def hand_over(
        self, buckets: frozenset[int], budget: float
    ) -> dict[tuple[str, str], Handed]:
        """Buckets given up: no new poll starts (the ownership says so already), the polls
        in flight end, and phase and reason changes are written, within `budget` seconds;
        requests still open then are cut (their sockets closed) and the watches are
        forgotten. Returns when each last polled and was to poll next, and since when a
        cut request was out, for the next holder (progress written only every progress
        interval would be older)."""
        ownership = self._ownership
        assert ownership is not None and self.adoption is not None
        self.adoption.stop(buckets)
        keys = [k for k in self.watches if ownership.bucket(*k) in buckets]
        for key in keys:
            self.scheduler.cancel(key)
        deadline = self._clock() + budget
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                await self.scheduler.wait_idle(keys)
        cut = {key for key in keys if self.scheduler.running(key)}
        if cut:
            # Left open, such a request would overlap with the next holder's first one.
            ownership.cut(buckets)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CUT_WAIT):
                    await self.scheduler.wait_idle(cut)
        refs = [self.watches[key].ref for key in keys if key in self.watches]
        await self.writer.settle(refs, max(0.0, deadline - self._clock()))
        handed: dict[tuple[str, str], Handed] = {}
        now = self._wall()
        for key in keys:
            watch = self.watches.get(key)
            if watch is not None and not watch.finished:
                since = watch.last_poll_time if key in cut else _busy_since(watch, now)
                handed[key] = Handed(watch.last_end, watch.next_poll_time, watch.attempts, since)
            self._forget(key)
        # Watches not taken in yet (a bucket given up again while being adopted, as in a
        # rolling update): the next holder needs their timing as much, or it polls them
        # from status progress minutes old, a few seconds after their last request.
        for key, timing in ownership.unadopted(buckets).items():
            handed.setdefault(key, timing)
        for key in self.adoption.known(buckets).difference(handed, keys):
            gone = ownership.vanished(*key)
            if gone is not None:
                handed[key] = Handed(gone, None, 0, gone)
        return handed

    def _ended_elsewhere(self, body: Mapping[str, Any]) -> None:
        """Another replica ended this watch while this one still had it (the writer's
        fenced write was refused): that end stands. Taken in again from the object as
        stored, the watch resumes as finished and writes nothing."""
        meta = body.get("metadata") or {}
        self._forget((str(meta.get("namespace")), str(meta.get("name"))))
        self.observe(None, body)

    def _forget(self, key: tuple[str, str]) -> None:
        self._reserved.discard(key)
        self._release(key)
        watch = self.watches.pop(key, None)
        if watch is not None:
            self.scheduler.cancel(key)
            self.writer.forget(watch.ref)

    def _adopt(
        self,
        key: tuple[str, str],
        ref: ObjectRef,
        generation: int,
        body: Mapping[str, Any],
        current: Watch | None,
    ) -> None:
        raw_spec = body.get("spec") or {}
        self.writer.stored(ref, body.get("status"))
        stored = body.get("status") or {}
        now = self._wall()
        spec: WatchSpec | None = None
        compiled: CompiledWatch | None = None
        problem: str | None = None
        try:
            spec = parse_spec(raw_spec)
            compiled = CompiledWatch.compile(spec)
            digest = spec_digest(spec)
        except (SpecError, ExpressionError) as exc:
            problem = str(exc)
            digest = f"invalid:{generation}"
        except Exception as exc:  # a spec that crashes the parser is still the spec's fault
            log.warning(
                "%s/%s: spec could not be parsed", key[0], key[1], exc_info=exc, extra=about(ref)
            )
            problem = f"spec could not be parsed ({type(exc).__name__})"
            digest = f"invalid:{generation}"

        timeout = spec.timeout if spec else 0.0
        watch = Watch(
            ref=ref,
            generation=generation,
            spec_hash=digest,
            spec=spec,
            compiled=compiled,
            suspended=bool(spec and spec.suspend),
            start_time=now,
            deadline=now + timeout,
        )
        same_watch = current is not None and current.spec_hash == digest
        resumed = same_watch or (stored.get("specHash") == digest and "startTime" in stored)
        if current is not None and same_watch:
            # A change of `suspend` alone: the same watch goes on.
            current.generation, current.suspended = generation, watch.suspended
            watch = current
        elif resumed:
            watch.resume_from(stored)
            self._take_over(key, watch, resumed=True)
        elif current is not None:
            # A new watch of the same object (a spec edit): the same job service may be
            # polled, so the timing floor counts from the old watch's last request.
            watch.last_end, watch.not_before = current.last_end, current.not_before
        else:
            self._take_over(key, watch, resumed=False)
        self.watches[key] = watch

        if problem is not None:
            if resumed and watch.finished:
                # Reported before this restart: an end is final (no new completionTime,
                # no second Event); only a new generation is acknowledged.
                if generation != stored.get("observedGeneration"):
                    self.writer.submit(watch, urgent=True)
                return
            self._finish(watch, policy.invalid_spec(problem), now)
            return
        if not resumed:
            self.writer.submit(watch, urgent=True)
            self.writer.event(watch)
        elif same_watch or generation != stored.get("observedGeneration"):
            self.writer.submit(watch, urgent=True)
        if watch.finished:
            return
        if watch.suspended:
            due = watch.deadline  # only to time it out: the deadline keeps counting
        elif resumed and not same_watch and watch.next_poll_time:
            # An operator restart or a takeover: keep the planned rhythm.
            due = self._paced(watch.next_poll_time, watch)
        else:
            due = self._paced(now, watch)
        self._plan(key, watch, due)

    def _paced(self, due: float, watch: Watch) -> float:
        """`due`, or for a poll due already once polling runs (a bucket taken over, a burst
        of new JobWatches) the next slot at START_UP_POLLS_PER_SECOND, within the watch's
        own interval: the spread `start_polling` gives the fleet at start-up."""
        now = self._wall()
        if not self._polling or due > now or watch.spec is None:
            return due
        self._next_slot = max(self._next_slot, now) + 1 / START_UP_POLLS_PER_SECOND
        return min(self._next_slot, now + watch.spec.interval)

    def _take_over(self, key: tuple[str, str], watch: Watch, *, resumed: bool) -> None:
        """A watch taken over from another replica: its timing as that replica left it
        (newer than the status progress), so that the rhythm and the timing floor hold
        across the handover; and no request before one the previous holder may still
        have open has ended, at the latest at its request timeout (one it cut at the
        handover, or any it sent before it vanished without one)."""
        ownership = self._ownership
        if ownership is None:
            return
        handed = ownership.handed(*key)
        busy_since = ownership.vanished(*key)
        if busy_since is not None:
            # Its last request was sent by then at the latest: the timing floor counts
            # from there (status progress, written every few minutes in a large fleet,
            # is older), and no request before a slow one could have ended (below).
            watch.last_end = max(watch.last_end or 0.0, busy_since)
        if handed is not None:
            if resumed:
                if handed.last_end is not None:
                    watch.last_end = max(watch.last_end or 0.0, handed.last_end)
                    watch.last_poll_time = max(watch.last_poll_time or 0.0, handed.last_end)
                if handed.next_poll is not None:
                    watch.next_poll_time = max(watch.next_poll_time or 0.0, handed.next_poll)
                watch.attempts = max(watch.attempts, handed.attempts)
            elif handed.last_end is not None:
                watch.last_end = max(watch.last_end or 0.0, handed.last_end)
            if handed.in_flight_since is not None:
                busy_since = max(busy_since or 0.0, handed.in_flight_since)
        if busy_since is not None and watch.spec is not None:
            watch.not_before = busy_since + watch.spec.request_timeout

    def _plan(self, key: tuple[str, str], watch: Watch, due_wall: float) -> None:
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
        delay = max(0.0, due_wall - self._wall())
        self.scheduler.schedule(key, self._clock() + delay)

    # --- one poll ----------------------------------------------------------

    async def poll(self, key: tuple[str, str]) -> None:
        """One poll of a watch.

        Whatever goes wrong in here stays with this watch: an unexpected exception at any
        step is its `Internal` error, retried with backoff until the deadline ends it. So
        every watch always has a next poll planned or an end phase.
        """
        watch = self.watches.get(key)
        if watch is None or watch.finished or watch.spec is None or watch.compiled is None:
            return
        if not self._ours(key):
            return
        stage = "planning the poll"
        try:
            spec = watch.spec
            now = self._wall()
            if policy.timed_out(now, watch.deadline):
                self._time_out(watch, now)
                return
            if watch.suspended:
                self._plan(key, watch, watch.deadline)
                return
            if (
                watch.last_end is not None
                and now < watch.last_end + policy.min_gap(spec) - FLOOR_SLACK
            ) or (watch.not_before is not None and now < watch.not_before - FLOOR_SLACK):
                # Planned before the last request ended (a poll held while the replaced
                # watch's request was out): the floor counts from that request's end.
                self._plan(key, watch, now)
                return
            stage = "reading Secrets"
            try:
                headers, sensitive = await self._headers(watch)
                tls = await self._tls(watch)
            except SecretProblem as problem:
                decision = policy.waiting(
                    spec,
                    watch.phase,
                    problem.reason,
                    str(problem),
                    now=now,
                    deadline=watch.deadline,
                    rand=self._rand,
                )
                self._apply(key, watch, decision, now)
                return
            except SecretUnavailable as unavailable:
                decision = policy.error(
                    spec,
                    watch.consecutive_errors,
                    "SecretUnavailable",
                    LastError(ErrorClass.TRANSIENT, str(unavailable)),
                    now=now,
                    deadline=watch.deadline,
                    rand=self._rand,
                )
                self._apply(key, watch, decision, now)
                return
            if self.watches.get(key) is not watch:
                return

            if not self._ours(key):
                return
            stage = "asking the host's limits"
            reserved = False
            if self._reserved and key in self._reserved:
                self._reserved.discard(key)
                reserved = True
            host = host_key(key[0], spec.url)
            ticket = self._hosts.admit(host, now, reserved)
            if isinstance(ticket, Held):
                self._hold(key, watch, host, ticket, now)
                return
            if self._held_back:
                self._count_delay(key, watch, now)

            stage = "sending the request"
            # What the exchange said about the host; nothing unless it took place.
            heard, pause, latency = Verdict.NOTHING, None, 0.0
            try:
                request = Request(
                    method=spec.method,
                    url=spec.url,
                    headers=headers,
                    sensitive_headers=sensitive,
                    body=spec.body.encode() if spec.body is not None else None,
                    timeout=policy.request_timeout(spec, now, watch.deadline),
                    tls=tls,
                )
                watch.attempts += 1
                watch.last_poll_time = now
                started = self._clock()
                try:
                    outcome = await self._send(key, request)
                finally:
                    latency = self._clock() - started
                    watch.last_end = self._wall()
                    successor = self.watches.get(key)
                    if successor is not None and successor is not watch:
                        successor.last_end = watch.last_end  # an edit replaced it meanwhile
                if outcome is None:
                    # Cut: not this replica's any more, or only for a handover. A poll
                    # planned again finds out which (a bucket renewed late goes on).
                    if self.watches.get(key) is watch and not watch.finished:
                        self._plan(key, watch, self._wall())
                    return
                heard = verdict(outcome)
                if isinstance(outcome, Response):
                    pause = policy.retry_after(outcome, watch.last_end)
                    if pause is not None:
                        # The host's other watches wait no longer than this one does.
                        pause = min(pause, spec.backoff.max_interval)
            finally:
                # On every path, cancellation included: the in-flight slot is given back.
                self._hosts.done(ticket, heard, self._wall(), pause, latency)
                if self._waiting:
                    self._wake(host)
            self._metrics.request_seconds.observe(latency)
            if self.watches.get(key) is not watch or watch.finished:
                return  # deleted, replaced or ended while the request was out
            stage = "judging the response"
            response = outcome if isinstance(outcome, Response) else None
            if response is not None:
                watch.record_response(response)
                await watch.compiled.prepare_verdict(response)  # off the loop if it iterates
                if self.watches.get(key) is not watch:
                    return
            now = self._wall()
            decision = policy.decide(
                spec,
                watch.compiled,
                outcome,
                watch.consecutive_errors,
                now=now,
                deadline=watch.deadline,
                rand=self._rand,
            )
            if decision.finished and response is not None:
                stage = "evaluating the result"
                await watch.compiled.prepare_result(response)
                if self.watches.get(key) is not watch:
                    return
            stage = "recording the outcome"
            self._apply(key, watch, decision, now, response)
        except Exception as exc:
            self._fault(key, watch, stage, exc)

    async def _send(self, key: tuple[str, str], request: Request) -> Outcome | None:
        """The request, cut (None) the moment this replica's hold on the watch's bucket
        ends, whatever stage it is in: DNS, connecting, sending, waiting for the answer,
        a redirect hop."""
        ownership = self._ownership
        if ownership is None:
            return await self._http.send(request)
        try:
            async with asyncio.timeout(None) as hold:
                bucket = ownership.guard(key[0], key[1], hold)
                try:
                    return await self._http.send(request)
                finally:
                    ownership.unguard(bucket, hold)
        except TimeoutError:
            return None

    def _hold(
        self, key: tuple[str, str], watch: Watch, host: HostKey, held: Held, now: float
    ) -> None:
        """The host is not taking this poll now: plan it for when the host allows. Not an
        attempt; the deadline still ends the watch (`_plan` never plans past it)."""
        assert watch.spec is not None
        if held.slot:
            self._reserved.add(key)
        limited = held.reason is HeldReason.RATE_LIMITED
        if limited:
            before = self._held_back.get(key)
            same = before is not None and before[1:] == (watch.next_poll_time, host)
            start = before[0] if before is not None and same else now
            if before is not None and (not same or held.slot):
                self._release(key)
        elif self._held_back:
            self._count_delay(key, watch, now)  # from here on the wait is the host's
        if limited and held.until - now < watch.spec.interval:
            # Spreading within less than the watch's own interval is not news for its
            # status (the held-polls metric counts it): the poll only moves.
            self._plan(key, watch, held.until)
        else:
            decision = policy.host_held(
                watch.phase,
                watch.consecutive_errors,
                watch.last_error,
                held.reason,
                held.message,
                delay=held.until - now,
                now=now,
                deadline=watch.deadline,
            )
            self._apply(key, watch, decision, now)
        if limited and watch.next_poll_time is not None:
            self._held_back[key] = (start, watch.next_poll_time, host)
            if not held.slot:  # keeps its place in line if it had one
                self._waiting.setdefault(host, {})[key] = None

    def _wake(self, host: HostKey) -> None:
        """A request to `host` ended: the first poll waiting for a slot there goes now."""
        waiting = self._waiting.get(host)
        while waiting and self._hosts.room(host, self._wall()):
            key = next(iter(waiting))
            del waiting[key]
            watch, entry = self.watches.get(key), self._held_back.get(key)
            if watch is None or entry is None or entry[1:] != (watch.next_poll_time, host):
                continue  # gone, or planned anew since
            self._plan(key, watch, self._wall())
            self._held_back[key] = (entry[0], watch.next_poll_time or 0.0, host)
            break
        if waiting is not None and not waiting:
            del self._waiting[host]

    def _count_delay(self, key: tuple[str, str], watch: Watch, now: float) -> None:
        """The poll of `key` goes out, or waits for another reason: count how long its
        host's limits held it, if this is the poll they held (not one planned since by an
        edit, a resume or a suspension)."""
        entry = self._release(key)
        if entry is not None and entry[1] == watch.next_poll_time:
            self._hosts.delayed(entry[2], now - entry[0])

    def _release(self, key: tuple[str, str]) -> tuple[float, float, HostKey] | None:
        entry = self._held_back.pop(key, None)
        if entry is not None:
            waiting = self._waiting.get(entry[2])
            if waiting is not None:
                waiting.pop(key, None)
                if not waiting:
                    del self._waiting[entry[2]]
        return entry

    def _fault(self, key: tuple[str, str], watch: Watch, stage: str, exc: Exception) -> None:
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
        now = self._wall()
        try:
            if watch.finished:  # it failed while ending: make sure the end is written
                self.writer.submit(watch, urgent=True)
                return
            if policy.timed_out(now, watch.deadline):  # a fault never outlives the deadline
                self._time_out(watch, now)
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
                rand=self._rand,
            )
            self._apply(key, watch, decision, now)
        except Exception:
            # Not even the error could be recorded: keep the watch alive at least, so
            # that the deadline (checked first at every poll) still ends it.
            log.exception(
                "%s/%s: recording the error failed",
                watch.ref.namespace,
                key[1],
                extra=about(watch.ref),
            )
            self.scheduler.schedule(key, self._clock() + max(watch.spec.interval, 1.0))

    def _apply(
        self,
        key: tuple[str, str],
        watch: Watch,
        decision: Decision,
        now: float,
        response: Response | None = None,
    ) -> None:
        """`response`: the one this decision was made on, if any (see `_finish`)."""
        self._metrics.polls.labels(decision.reason).inc()
        if decision.finished:
            self._finish(watch, decision, now, response)
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
        self._plan(key, watch, now + (decision.delay or 0.0))
        self.writer.submit(watch, urgent=changed)
        if phase_changed:
            self.writer.event(watch)

    def _time_out(self, watch: Watch, now: float) -> None:
        decision = policy.deadline_exceeded(
            watch.attempts,
            watch.consecutive_errors,
            watch.last_error,
            suspended=watch.suspended,
            not_sent=watch.message if watch.reason in NOT_SENT_REASONS else None,
        )
        self._finish(watch, decision, now)

    def _finish(
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

    # --- Secrets -----------------------------------------------------------

    async def _secret_value(self, namespace: str, name: str, key: str, use: str) -> bytes:
        try:
            secret = await self._secrets.get(namespace, name)
        except SecretUnavailable:
            raise
        except Exception as exc:  # the cache's own fault: still only this watch's error
            log.error("reading Secret %s/%s failed", namespace, name, exc_info=exc)
            raise SecretUnavailable(
                f"Secret {name!r} ({use}) could not be read ({type(exc).__name__})"
            ) from None
        if secret is None:
            raise SecretProblem(
                "SecretNotFound", f"Secret {name!r} ({use}) was not found in namespace {namespace}"
            )
        if secret.labels.get(ALLOW_LABEL) != "true":
            raise SecretProblem(
                "SecretNotAllowed",
                f'Secret {name!r} ({use}) lacks the label {ALLOW_LABEL}: "true"',
            )
        if key not in secret.data:
            raise SecretProblem("SecretNotFound", f"Secret {name!r} ({use}) has no key {key!r}")
        return secret.data[key]

    async def _headers(self, watch: Watch) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
        assert watch.spec is not None
        headers: list[tuple[str, str]] = []
        sensitive: set[str] = set()
        for header in watch.spec.headers:
            if header.secret_name is None or header.secret_key is None:
                headers.append((header.name, header.value or ""))
                continue
            value = await self._secret_value(
                watch.ref.namespace,
                header.secret_name,
                header.secret_key,
                f"header {header.name}",
            )
            headers.append((header.name, value.decode(errors="replace").strip()))
            sensitive.add(header.name.lower())
        return tuple(headers), frozenset(sensitive)

    async def _tls(self, watch: Watch) -> TLSSettings:
        assert watch.spec is not None
        tls = watch.spec.tls
        ca_pem = None
        if tls.ca_secret_name and tls.ca_secret_key:
            ca = await self._secret_value(
                watch.ref.namespace, tls.ca_secret_name, tls.ca_secret_key, "tls.caSecretRef"
            )
            ca_pem = ca.decode(errors="replace")
        return TLSSettings(insecure_skip_verify=tls.insecure_skip_verify, ca_pem=ca_pem)


def _busy_since(watch: Watch, now: float) -> float | None:
    """When a request another replica may still have open for `watch` was sent (taken
    over, not polled since): the next holder must wait for it as this one does."""
    if watch.not_before is None or watch.spec is None or watch.not_before <= now:
        return None
    return watch.not_before - watch.spec.request_timeout
