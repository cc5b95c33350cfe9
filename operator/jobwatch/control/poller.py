"""One poll of a watch, the scheduler's job: the deadline and the timing floor, the
request's Secrets, the host's limits, the exchange, and what the policy makes of it.

Layer: control. Whatever goes wrong in here stays with the watch being polled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from jobwatch.control.handover import still_ours
from jobwatch.control.hostwaits import Key
from jobwatch.control.requestparts import PartsReader, RequestParts, SecretProblem
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.watchbook import WatchBook
from jobwatch.core import policy
from jobwatch.core.outcome import Outcome, Response
from jobwatch.core.policy import ErrorClass, LastError
from jobwatch.core.watch import Watch
from jobwatch.jobservice.client import HttpClient, Request
from jobwatch.jobservice.hosts import Held, HeldReason, HostKey, Hosts, Ticket, Verdict, verdict
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.secrets import SecretUnavailable

# A poll released this much before its floor (the scheduler releases up to EARLY early)
# still goes: re-planning it would only spin.
FLOOR_SLACK = 0.002


@dataclass(slots=True)
class _Step:
    """What a poll was doing, for its `Internal` error if that step raises."""

    name: str = "planning the poll"


class Poller:
    def __init__(
        self,
        book: WatchBook,
        hosts: Hosts,
        http: HttpClient,
        parts: PartsReader,
        *,
        metrics: Metrics,
        ownership: Ownership | None,
    ) -> None:
        self._book, self._hosts, self._http, self._parts = book, hosts, http, parts
        self._metrics, self._ownership = metrics, ownership

    async def poll(self, key: Key) -> None:
        """One poll of a watch.

        Whatever goes wrong in here stays with this watch: an unexpected exception at any
        step is its `Internal` error, retried with backoff until the deadline ends it. So
        every watch always has a next poll planned or an end phase.
        """
        watch = self._book.watches.get(key)
        if watch is None or watch.finished or watch.spec is None or watch.compiled is None:
            return
        if not self._ours(key):
            return
        step = _Step()
        try:
            await self._poll(key, watch, step)
        except Exception as exc:
            self._book.fault(key, watch, step.name, exc)

    async def _poll(self, key: Key, watch: Watch, step: _Step) -> None:
        assert watch.spec is not None
        now = self._book.wall()
        if not self._due(key, watch, now):
            return
        step.name = "reading Secrets"
        parts = await self._read_parts(key, watch, now)
        if parts is None or self._book.watches.get(key) is not watch:
            return
        if not self._ours(key):
            return
        step.name = "asking the host's limits"
        reserved = self._book.waits.take_reservation(key)
        host = self._hosts.key(key[0], watch.spec.url)
        ticket = self._admit(key, watch, host, reserved, now)
        if ticket is None:
            return
        step.name = "sending the request"
        outcome = await self._exchange(key, watch, host, ticket, parts=parts, now=now)
        if outcome is not None:
            step.name = "judging the response"
            await self._judge(key, watch, outcome, step, sent=now)

    def _ours(self, key: Key) -> bool:
        """Still this replica's to poll? (`handover.still_ours`)"""
        return still_ours(self._book, self._ownership, key)

    def _due(self, key: Key, watch: Watch, now: float) -> bool:
        """Whether a request goes now; if not, the watch is ended or planned again."""
        assert watch.spec is not None
        if policy.timed_out(now, watch.deadline):
            self._book.time_out(watch, now)
            return False
        if watch.suspended:
            self._book.plan(key, watch, watch.deadline)
            return False
        if (
            watch.last_end is not None
            and now < watch.last_end + policy.min_gap(watch.spec) - FLOOR_SLACK
        ) or (watch.not_before is not None and now < watch.not_before - FLOOR_SLACK):
            # Planned before the last request ended (a poll held while the replaced
            # watch's request was out): the floor counts from that request's end.
            self._book.plan(key, watch, now)
            return False
        return True

    async def _read_parts(self, key: Key, watch: Watch, now: float) -> RequestParts | None:
        """The request's headers and TLS settings; None: a Secret is missing, not allowed
        or cannot be read, and the watch waits or counts an error."""
        spec = watch.spec
        assert spec is not None
        try:
            return await self._parts.read(watch)
        except SecretProblem as problem:
            decision = policy.waiting(
                spec,
                watch.phase,
                problem.reason,
                str(problem),
                now=now,
                deadline=watch.deadline,
                rand=self._book.rand,
            )
        except SecretUnavailable as unavailable:
            decision = policy.error(
                spec,
                watch.consecutive_errors,
                "SecretUnavailable",
                LastError(ErrorClass.TRANSIENT, str(unavailable)),
                now=now,
                deadline=watch.deadline,
                rand=self._book.rand,
            )
        self._book.apply(key, watch, decision, now)
        return None

    def _admit(
        self, key: Key, watch: Watch, host: HostKey, reserved: bool, now: float
    ) -> Ticket | None:
        """The host's leave to send (a slot in flight); None: its limits hold the poll
        (`reserved`: they kept a slot for it)."""
        waits = self._book.waits
        ticket = self._hosts.admit(host, now, reserved)
        if isinstance(ticket, Held):
            self._hold(key, watch, host, ticket, now)
            return None
        if waits.any_held:
            waits.count_delay(key, watch.next_poll_time, now)
        return ticket

    async def _exchange(
        self,
        key: Key,
        watch: Watch,
        host: HostKey,
        ticket: Ticket,
        *,
        parts: RequestParts,
        now: float,
    ) -> Outcome | None:
        """Sends the request and gives the host's slot back, with what the exchange said
        about the host. None: nothing to judge (the request was cut, or the watch was
        deleted, replaced or ended while it was out)."""
        spec = watch.spec
        assert spec is not None
        book = self._book
        # What the exchange said about the host; nothing unless it took place.
        heard, pause, latency = Verdict.NOTHING, None, 0.0
        try:
            request = parts.request(spec, policy.request_timeout(spec, now, watch.deadline))
            watch.attempts += 1
            watch.last_poll_time = now
            started = book.clock()
            try:
                outcome = await self._send(key, request)
            finally:
                latency = book.clock() - started
                watch.last_end = book.wall()
                successor = book.watches.get(key)
                if successor is not None and successor is not watch:
                    successor.last_end = watch.last_end  # an edit replaced it meanwhile
            if outcome is None:
                # Cut: not this replica's any more, or only for a handover. A poll
                # planned again finds out which (a bucket renewed late goes on).
                if book.watches.get(key) is watch and not watch.finished:
                    book.plan(key, watch, book.wall())
                return None
            heard = verdict(outcome)
            if policy.cut_by_deadline(spec, outcome, now, watch.deadline) is not None:
                # The deadline's doing, not the host's: a fleet created together, whose
                # deadlines fall together, must not open the breaker on a healthy host.
                heard = Verdict.NOTHING
            if isinstance(outcome, Response):
                pause = policy.retry_after(outcome, watch.last_end)
                if pause is not None:
                    # The host's other watches wait no longer than this one does.
                    pause = min(pause, spec.backoff.max_interval)
        finally:
            # On every path, cancellation included: the in-flight slot is given back.
            self._hosts.done(ticket, heard, book.wall(), pause, latency)
            if book.waits.anyone_in_line:
                self._wake(host)
        self._metrics.request_seconds.observe(latency)
        if book.watches.get(key) is not watch or watch.finished:
            return None  # deleted, replaced or ended while the request was out
        return outcome

    async def _send(self, key: Key, request: Request) -> Outcome | None:
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

    async def _judge(
        self, key: Key, watch: Watch, outcome: Outcome, step: _Step, *, sent: float
    ) -> None:
        """What the policy makes of the outcome of the request sent at `sent`, recorded."""
        spec, compiled, book = watch.spec, watch.compiled, self._book
        assert spec is not None and compiled is not None
        cut_after = policy.cut_by_deadline(spec, outcome, sent, watch.deadline)
        if cut_after is not None:
            book.time_out(watch, book.wall(), cut_after)
            return
        response = outcome if isinstance(outcome, Response) else None
        if response is not None:
            watch.record_response(response)
            await compiled.prepare_verdict(response)  # off the loop if it iterates
            if book.watches.get(key) is not watch:
                return
        now = book.wall()
        decision = policy.decide(
            spec,
            compiled,
            outcome,
            watch.consecutive_errors,
            now=now,
            deadline=watch.deadline,
            rand=book.rand,
        )
        if decision.finished and response is not None:
            step.name = "evaluating the result"
            await compiled.prepare_result(response)
            if book.watches.get(key) is not watch:
                return
        step.name = "recording the outcome"
        book.apply(key, watch, decision, now, response)

    def _hold(self, key: Key, watch: Watch, host: HostKey, held: Held, now: float) -> None:
        """The host is not taking this poll now: plan it for when the host allows. Not an
        attempt; the deadline still ends the watch (`plan` never plans past it)."""
        assert watch.spec is not None
        waits = self._book.waits
        if held.slot:
            waits.reserve(key)
        limited = held.reason is HeldReason.RATE_LIMITED
        start = now
        if limited:
            start = waits.held_since(key, watch.next_poll_time, host, now, held.slot)
        elif waits.any_held:
            # From here on the wait is the host's.
            waits.count_delay(key, watch.next_poll_time, now)
        if limited and held.until - now < watch.spec.interval:
            # Spreading within less than the watch's own interval is not news for its
            # status (the held-polls metric counts it): the poll only moves.
            self._book.plan(key, watch, held.until)
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
            self._book.apply(key, watch, decision, now)
        if limited and watch.next_poll_time is not None:
            # Keeps its place in line if it had one.
            waits.hold(key, start, watch.next_poll_time, host, line=not held.slot)

    def _wake(self, host: HostKey) -> None:
        """A request to `host` ended: the first poll waiting for a slot there goes now."""
        book, waits = self._book, self._book.waits
        while waits.in_line(host) and self._hosts.room(host, book.wall()):
            key = waits.pop_line(host)
            watch, entry = book.watches.get(key), waits.held(key)
            if watch is None or entry is None or entry[1:] != (watch.next_poll_time, host):
                continue  # gone, or planned anew since
            book.plan(key, watch, book.wall())
            waits.hold(key, entry[0], watch.next_poll_time or 0.0, host, line=False)
            break
