"""Turns watch events into watches, and runs one poll of a watch.

This is where the pieces meet: the spec, the policy, the HTTP client, the
scheduler and the status writer. The decisions themselves are in policy.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import policy
from .config import Config
from .expressions import CompiledWatch, ExpressionError, final_result
from .httpclient import HttpClient, Request, TLSSettings
from .kube import KubeApi, ObjectRef
from .metrics import Metrics
from .outcome import Response
from .policy import Decision, Phase
from .scheduler import Scheduler
from .spec import SpecError, WatchSpec, parse_spec, spec_digest
from .status import StatusWriter
from .watch import Watch

log = logging.getLogger(__name__)

ALLOW_LABEL = "jobwatch.dev/allow-use"
# A timer that fires a hair early must not poll just before the deadline with
# a request timeout of a few milliseconds: aim just past it instead.
DEADLINE_SLACK = 0.005
# How fast the polls already due when polling starts are sent: about half of what one
# process sustains, so the first round never queues behind itself.
START_UP_POLLS_PER_SECOND = 1000.0


class SecretProblem(Exception):
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
    ) -> None:
        self._api, self._http, self._metrics = api, http, metrics
        self._wall, self._clock, self._rand = wall, clock, rand
        self.watches: dict[tuple[str, str], Watch] = {}
        self.writer = StatusWriter(
            api,
            metrics,
            qps=config.status_qps,
            burst=config.status_burst,
            progress_interval=config.progress_interval,
            wall=wall,
            clock=clock,
        )
        self.scheduler: Scheduler[tuple[str, str]] = Scheduler(
            self.poll, workers=config.max_in_flight, metrics=metrics, clock=clock
        )
        self._writer_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts publishing status. Polls wait for `start_polling`."""
        self._writer_task = asyncio.create_task(self.writer.run(), name="jobwatch-status-writer")

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
        self.scheduler.start()

    async def stop_polling(self) -> None:
        """Cancels the polls in flight and plans no more. Interrupted watches stay Polling."""
        await self.scheduler.stop()

    async def shutdown(self, budget: float) -> None:
        """Stops polling and flushes status within `budget` seconds."""
        await self.stop_polling()
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        await self.writer.flush(budget)

    # --- watch events ------------------------------------------------------

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Takes one watch event of a JobWatch. Cheap: our own status echoes end early."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        current = self.watches.get(key)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self._forget(key)
            return
        generation = int(meta.get("generation") or 0)
        uid = str(meta.get("uid"))
        if current is not None and current.ref.uid == uid and current.generation == generation:
            return
        if current is not None and current.ref.uid != uid:
            self._forget(key)
            current = None
        self._adopt(key, ObjectRef(key[0], key[1], uid), generation, body, current)

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

    def _forget(self, key: tuple[str, str]) -> None:
        watch = self.watches.pop(key, None)
        if watch is not None:
            self.scheduler.cancel(key)
            self.writer.forget(watch.ref)
            self._count()

    def _count(self) -> None:
        self._metrics.watches.set(len(self.watches))

    def _adopt(
        self,
        key: tuple[str, str],
        ref: ObjectRef,
        generation: int,
        body: Mapping[str, Any],
        current: Watch | None,
    ) -> None:
        raw_spec = body.get("spec") or {}
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
        self.watches[key] = watch
        self._count()

        if problem is not None:
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
            due = watch.next_poll_time  # an operator restart: keep the planned rhythm
        else:
            due = now
        self._plan(key, watch, due)

    def _plan(self, key: tuple[str, str], watch: Watch, due_wall: float) -> None:
        due_wall = min(due_wall, watch.deadline + DEADLINE_SLACK)
        watch.next_poll_time = due_wall
        delay = max(0.0, due_wall - self._wall())
        self.scheduler.schedule(key, self._clock() + delay)

    # --- one poll ----------------------------------------------------------

    async def poll(self, key: tuple[str, str]) -> None:
        watch = self.watches.get(key)
        if watch is None or watch.finished or watch.spec is None or watch.compiled is None:
            return
        spec = watch.spec
        now = self._wall()
        if policy.timed_out(now, watch.deadline):
            self._finish(watch, policy.deadline_exceeded(watch.consecutive_errors), now)
            return
        if watch.suspended:
            self._plan(key, watch, watch.deadline)
            return
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
        if self.watches.get(key) is not watch:
            return

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
        outcome = await self._http.send(request)
        self._metrics.request_seconds.observe(self._clock() - started)
        if self.watches.get(key) is not watch or watch.finished:
            return  # deleted, replaced or ended while the request was out
        if isinstance(outcome, Response):
            watch.record_response(outcome)
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
        self._apply(key, watch, decision, now)

    def _apply(self, key: tuple[str, str], watch: Watch, decision: Decision, now: float) -> None:
        self._metrics.polls.labels(decision.reason).inc()
        if decision.finished:
            self._finish(watch, decision, now)
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

    def _finish(self, watch: Watch, decision: Decision, now: float) -> None:
        watch.phase, watch.reason, watch.message = decision.phase, decision.reason, decision.message
        watch.consecutive_errors = decision.consecutive_errors
        watch.last_error = decision.error
        watch.completion_time = now
        watch.next_poll_time = None
        if watch.compiled is not None:
            watch.result, omitted = final_result(watch.compiled, watch.response)
            if omitted:
                watch.message = f"{watch.message}; {omitted}"
        watch.response = None
        self.scheduler.cancel((watch.ref.namespace, watch.ref.name))
        self.writer.submit(watch, urgent=True)
        self.writer.event(watch)
        log.info("%s/%s %s: %s", watch.ref.namespace, watch.ref.name, watch.phase, watch.message)

    # --- Secrets -----------------------------------------------------------

    async def _secret_value(self, namespace: str, name: str, key: str, use: str) -> bytes:
        secret = await self._api.get_secret(namespace, name)
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
