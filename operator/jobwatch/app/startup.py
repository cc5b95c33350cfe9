"""What start-up builds, and the state the kopf handlers share.

`Operator` is made by __main__ before kopf starts and handed to `kopf.operator` as its
`memo`: kopf passes operator-level handlers (login, start-up, clean-up) that very object,
whatever its type (resource handlers, of which there are none, would get a shallow
copy). The start-up handler fills in `running` from `build`, the one place the API
client, the HTTP client, the runtime, the informer and the lease elector are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import kopf
from aiohttp import web

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.sharding.elector import Elector
from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.core.expressions import Cel
from jobwatch.jobservice.client import HttpClient
from jobwatch.kits.metrics import Metrics
from jobwatch.kube import login as kubelogin
from jobwatch.kube.api import KubeApi
from jobwatch.kube.informer import Informer

log = logging.getLogger(__name__)
# How long polling waits for the initial listing (a namespace the operator may not
# list, for one, never completes it; its error is logged meanwhile).
SYNC_TIMEOUT = 60
# How long the first listing waits for the lease elector's first takes (two rounds, a
# retry period apart, normally a few seconds) before it goes ahead anyway.
FIRST_TAKES_WAIT = 15.0


@dataclass
class Running:
    """The operator's parts from start-up on (`build`)."""

    api: KubeApi
    http: HttpClient
    runtime: Runtime
    informer: asyncio.Task[None]
    starter: asyncio.Task[None]  # starts polling once the initial listing is in
    elector: Elector | None  # with replicas (JOBWATCH_LEASE_NAMESPACE)
    electing: asyncio.Task[None] | None
    metrics_runner: web.AppRunner | None

    def problem(self) -> str | None:
        """Why the process is not healthy, or None: a long-lived task has ended."""
        if self.informer.done():
            return "the JobWatch informer has stopped"
        if self.electing is not None and self.electing.done():
            return "the lease elector has stopped"
        if self.elector is not None and self.elector.disagreement is not None:
            return self.elector.disagreement
        if self.runtime.writer_stopped:
            return "the status writer has stopped"
        return None


@dataclass
class Operator:
    """What the handlers share: kopf's `memo`."""

    config: Config
    metrics_listener: socket.socket | None  # bound by __main__ before kopf starts
    # Handed to kopf.operator: set on SIGTERM/SIGINT, after polling has been stopped.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    running: Running | None = None  # set by the start-up handler
    stopping: asyncio.Task[None] | None = None  # held so the loop keeps the task alive
    signalled_at: float | None = None  # loop time of the signal

    def problem(self) -> str | None:
        """Why the process is not healthy, or None (also before start-up)."""
        return self.running.problem() if self.running is not None else None


async def build(
    config: Config,
    settings: kopf.OperatorSettings,
    metrics_listener: socket.socket | None,
    on_signal: Callable[[int], None],
) -> Running:
    """Builds and starts the operator's parts; polling starts once the initial listing
    is in, and from then on SIGTERM and SIGINT go to `on_signal`."""
    metrics = Metrics()
    # Served first: from here on nothing awaits, so the caller holds the `Running`
    # before any task started here runs.
    metrics_runner = await metrics.serve(metrics_listener) if metrics_listener is not None else None
    # Called again on a 401, to pick up a rotated token.
    api = KubeApi(lambda: kubelogin.login(settings))
    http = HttpClient(
        config.egress, max_body_bytes=config.max_body_bytes, max_connections=config.max_in_flight
    )
    ownership = None
    if config.leases is not None:
        ownership = Ownership(
            config.leases, scopes=config.namespaces or (None,), clock=time.monotonic
        )
    runtime = Runtime(config, api, http, metrics, ownership=ownership, cel=Cel())
    runtime.start()
    elector: Elector | None = None

    async def first_takes() -> None:
        """With replicas: the first listing waits for this replica's first buckets, so
        that it adopts their watches itself (one list, not a list and then reads or a
        second list), before polling starts with its start-up spread."""
        if elector is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FIRST_TAKES_WAIT):
                    await elector.first_takes.wait()

    informer = Informer(
        api,
        config.namespaces,
        config.labels,
        observe=runtime.observe,
        keep_only=runtime.keep_only,
        listing=ownership.listing if ownership is not None else None,
        before_listing=first_takes if ownership is not None else None,
    )
    informing = asyncio.create_task(informer.run(), name="jobwatch-informer")
    electing = None
    if config.leases is not None and ownership is not None:
        elector, electing = _elect(config.leases, api, ownership, _Handover(runtime, informer))
        metrics.leases.source = elector.figures
    starter = asyncio.create_task(_poll_when_synced(informer, runtime, on_signal))
    log.info(
        "jobwatch started: %s, %d requests in flight at most",
        "namespaces " + ", ".join(config.namespaces) if config.namespaces else "cluster-wide",
        config.max_in_flight,
    )
    return Running(api, http, runtime, informing, starter, elector, electing, metrics_runner)


def _elect(
    settings: LeaseSettings, api: KubeApi, ownership: Ownership, handover: _Handover
) -> tuple[Elector, asyncio.Task[None]]:
    """The lease elector, running."""
    elector = Elector(settings, api, ownership, handover, clock=time.monotonic, wall=time.time)
    return elector, asyncio.create_task(elector.run(), name="jobwatch-leases")


class _Handover:
    """The runtime and the informer, as the lease elector needs them."""

    def __init__(self, runtime: Runtime, informer: Informer) -> None:
        self._runtime, self._informer = runtime, informer

    def adopt(self, buckets: frozenset[int]) -> None:
        adoption = self._runtime.adoption
        assert adoption is not None
        if not adoption.adopt(buckets, listed=self._informer.synced.is_set()):
            self._informer.relist()

    def resume(self, buckets: frozenset[int]) -> None:
        self._runtime.resume(buckets)

    def drop(self, buckets: frozenset[int]) -> None:
        self._runtime.drop(buckets)

    async def hand_over(
        self, buckets: frozenset[int], budget: float
    ) -> dict[tuple[str, str], Handed]:
        return await self._runtime.hand_over(buckets, budget)


async def _poll_when_synced(
    informer: Informer, runtime: Runtime, on_signal: Callable[[int], None]
) -> None:
    """Starts polling once the initial listing is in, as controllers wait for their
    caches to sync.

    Polls started while the listing is still coming in would take the event loop from
    it: at 10k JobWatches the listing then took 12 s instead of about 3. When the
    listing is in, `gc.freeze()` moves what start-up built out of the GC's sight: full
    collections would otherwise walk 10k watches' state again and again, a pause of
    over a second each.
    """
    try:
        async with asyncio.timeout(SYNC_TIMEOUT):
            await informer.synced.wait()
    except TimeoutError:
        log.warning(
            "initial listing not complete after %d s: polling the %d JobWatches listed so far",
            SYNC_TIMEOUT,
            len(runtime.watches),
        )
    gc.collect()
    gc.freeze()
    # From here on SIGTERM and SIGINT are ours: kopf would call the clean-up handler
    # only after stopping its own tasks, seconds later on a busy loop, and polls would
    # go on meanwhile. kopf then stops through `Operator.stop`. (kopf installs its
    # handlers while start-up runs; the listing's round trips come after that, so these
    # win.)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    runtime.start_polling()
    log.info("polling %d watches; %d objects frozen", len(runtime.watches), gc.get_freeze_count())
