"""The polling side of one replica: wires the intake, the poll pipeline, the handover, the
scheduler and the status writer around the watches they share, and starts and stops them.

Layer: control. What each part does is in its own module: intake.py (events into
watches), poller.py (one poll), handover.py (buckets between replicas), watchbook.py
(the shared watches, planning and recording), hostwaits.py (polls held by their host's
limits), requestparts.py (Secrets into requests), reaper.py (finished watches deleted
after their TTL).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from jobwatch.control.handover import BucketHandover
from jobwatch.control.hostwaits import HostWaits, Key
from jobwatch.control.intake import Intake
from jobwatch.control.poller import Poller
from jobwatch.control.reaper import Reaper
from jobwatch.control.requestparts import PartsReader
from jobwatch.control.scheduler import Scheduler
from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.status.writer import StatusWriter
from jobwatch.control.watchbook import START_UP_POLLS_PER_SECOND, WatchBook
from jobwatch.core.expressions import Cel
from jobwatch.core.policy import Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.jobservice.client import HttpClient
from jobwatch.jobservice.hosts import Hosts, HostSettings
from jobwatch.kits.metrics import FleetFigures, HostFigures, Metrics
from jobwatch.kube.api import KubeApi
from jobwatch.kube.secrets import SecretCache


class RuntimeSettings(Protocol):
    """The settings the runtime reads: the process's configuration (`app.config.Config`)
    has them; declared here so that the control layer does not import the shell."""

    @property
    def max_in_flight(self) -> int: ...
    @property
    def progress_interval(self) -> float: ...
    @property
    def status_qps(self) -> float: ...
    @property
    def status_burst(self) -> int: ...
    @property
    def event_qps(self) -> float: ...
    @property
    def event_burst(self) -> int: ...
    @property
    def secret_ttl(self) -> float: ...
    @property
    def secret_qps(self) -> float: ...
    @property
    def secret_burst(self) -> int: ...
    @property
    def delete_qps(self) -> float: ...
    @property
    def delete_burst(self) -> int: ...
    @property
    def hosts(self) -> HostSettings: ...
    @property
    def leases(self) -> LeaseSettings | None: ...
    @property
    def identity(self) -> str: ...


class Runtime:
    """The parts of one replica's polling, wired around the watches they share; what
    `startup`, the handlers and the elector call."""

    def __init__(
        self,
        config: RuntimeSettings,
        api: KubeApi,
        http: HttpClient,
        metrics: Metrics,
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        ownership: Ownership | None = None,
        cel: Cel | None = None,
    ) -> None:
        self._metrics, self._ownership = metrics, ownership
        self._wall, self._clock, self._rand = wall, clock, rand
        self.writer = _status_writer(
            config,
            api,
            metrics,
            wall=wall,
            clock=clock,
            may_write=self._writable,
            on_foreign_end=self._ended_elsewhere,
        )
        self.scheduler: Scheduler[Key] = Scheduler(
            self.poll, workers=config.max_in_flight, metrics=metrics, clock=clock
        )
        # Breaker, in-flight limit, rate cap and Retry-After hold per job service host.
        self._hosts = Hosts(config.hosts, rand)
        self._book = WatchBook(
            self.scheduler,
            self.writer,
            metrics,
            HostWaits(self._hosts),
            wall=wall,
            clock=clock,
            rand=rand,
        )
        self.watches = self._book.watches
        self._reaper = Reaper(
            self._book,
            api,
            metrics,
            ownership,
            qps=config.delete_qps,
            burst=config.delete_burst,
            observe=lambda body: self.observe(None, body),
        )
        self._intake = Intake(
            self._book,
            api,
            metrics,
            ownership,
            cel if cel is not None else Cel(),
            reaper=self._reaper,
        )
        self.adoption = self._intake.adoption
        self._handover = (
            BucketHandover(self._book, ownership, self.adoption)
            if ownership is not None and self.adoption is not None
            else None
        )
        self._poller = Poller(
            self._book,
            self._hosts,
            http,
            PartsReader(_secret_cache(config, api, clock)),
            metrics=metrics,
            ownership=ownership,
        )
        metrics.internals.scheduler_entries = lambda: self.scheduler.entries
        metrics.fleet.source = self._fleet_figures
        metrics.hosts.source = self._host_figures
        self._writer_task: asyncio.Task[None] | None = None

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
            self._book.plan(key, watch, now + self._rand() * min(spread, watch.spec.interval))
        self._book.polling = True
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

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Takes one watch event of a JobWatch (`Intake.observe`); never raises."""
        self._intake.observe(event_type, body)

    def keep_only(self, namespace: str | None, keys: set[Key]) -> None:
        """After a fresh list of `namespace` (None: all): forgets the watches not in it."""
        self._intake.keep_only(namespace, keys)

    async def poll(self, key: Key) -> None:
        """The scheduler's job: one poll of a watch (`Poller.poll`), or for a finished
        one, its deletion after the TTL (`Reaper.run`)."""
        watch = self.watches.get(key)
        if watch is not None and watch.finished:
            await self._reaper.run(key)
        else:
            await self._poller.poll(key)

    def drop(self, buckets: frozenset[int]) -> None:
        """Lost buckets: their watches are forgotten (`BucketHandover.drop`)."""
        assert self._handover is not None
        self._handover.drop(buckets)

    def resume(self, buckets: frozenset[int]) -> None:
        """Parked buckets are this replica's again (`BucketHandover.resume`)."""
        assert self._handover is not None
        self._handover.resume(buckets)

    async def hand_over(self, buckets: frozenset[int], budget: float) -> dict[Key, Handed]:
        """Buckets given up, within `budget` seconds (`BucketHandover.hand_over`)."""
        assert self._handover is not None
        return await self._handover.hand_over(buckets, budget)

    def _writable(self, ref: ObjectRef) -> bool:
        ownership = self._ownership
        return ownership is None or ownership.writable(ref.namespace, ref.name, self._clock())

    def _ended_elsewhere(self, body: Mapping[str, Any]) -> None:
        """Another replica ended this watch while this one still had it (the writer's
        fenced write was refused): that end stands. Taken in again from the object as
        stored, the watch resumes as finished and writes nothing."""
        meta = body.get("metadata") or {}
        self._book.forget((str(meta.get("namespace")), str(meta.get("name"))))
        self.observe(None, body)


def _status_writer(
    config: RuntimeSettings,
    api: KubeApi,
    metrics: Metrics,
    *,
    wall: Callable[[], float],
    clock: Callable[[], float],
    may_write: Callable[[ObjectRef], bool],
    on_foreign_end: Callable[[Mapping[str, Any]], None],
) -> StatusWriter:
    return StatusWriter(
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
        may_write=may_write,
        on_foreign_end=on_foreign_end,
    )


def _secret_cache(config: RuntimeSettings, api: KubeApi, clock: Callable[[], float]) -> SecretCache:
    """Reads of the Secrets that headers and CA bundles refer to: shared by every watch
    that uses the same Secret, inside a fleet-wide budget of API reads."""
    return SecretCache(
        api,
        ttl=config.secret_ttl,
        missing_ttl=min(config.secret_ttl, 5.0),
        reads_per_second=config.secret_qps,
        burst=config.secret_burst,
        clock=clock,
    )
