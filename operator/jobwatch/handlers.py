"""The kopf handlers: thin, they start and stop the service.

kopf runs the process: credentials, signals, start-up and clean-up (`/healthz` is
ours, served by __main__.py on a socket bound before kopf starts). JobWatch events
come from our own informer (informer.py), not from kopf's watching, which costs
milliseconds of CPU per event (our status echoes included) and took minutes to adopt
10k JobWatches. kopf's daemons and timers would also have put a
finalizer on every JobWatch (kopf issues #1074, #833): a JobWatch, or its namespace,
could then not be deleted while the operator is not running. Nothing here adds one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from aiohttp import web

from . import kube
from .config import Config
from .httpclient import HttpClient
from .informer import Informer
from .kube import KubeApi
from .leases import Elector, Handed, Ownership
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger(__name__)
# How long polling waits for the initial listing (a namespace the operator may not
# list, for one, never completes it; its error is logged meanwhile).
SYNC_TIMEOUT = 60
# Of the shutdown budget, what is kept for closing the clients and kopf's own exit
# after the status flush.
EXIT_RESERVE = 2.0


@dataclass
class Service:
    """What the handlers share; filled at start-up."""

    config: Config | None = None
    runtime: Runtime | None = None
    api: KubeApi | None = None
    http: HttpClient | None = None
    metrics_listener: socket.socket | None = None  # bound by __main__ before kopf starts
    metrics_runner: web.AppRunner | None = None
    informer: asyncio.Task[None] | None = None
    elector: Elector | None = None  # with replicas (JOBWATCH_LEASE_NAMESPACE)
    electing: asyncio.Task[None] | None = None
    starter: asyncio.Task[None] | None = None
    # Handed to kopf.run: set on SIGTERM/SIGINT, after polling has been stopped.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Task[None] | None = None  # held so the loop keeps the task alive
    signalled_at: float | None = None  # loop time of the signal

    def problem(self) -> str | None:
        """Why the process is not healthy, or None: a long-lived task has ended."""
        if self.informer is not None and self.informer.done():
            return "the JobWatch informer has stopped"
        if self.electing is not None and self.electing.done():
            return "the lease elector has stopped"
        if self.runtime is not None and self.runtime.writer_stopped:
            return "the status writer has stopped"
        return None


service = Service()
# At most this long from SIGTERM to the Leases released (the rest of the shutdown budget
# flushes what else is queued): other replicas take the buckets within seconds.
HANDOVER_BUDGET = 3.0


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login is ours (kube.login), so that kopf's own, through the `kubernetes`
    package when it is installed, does not import it."""
    return kube.login(settings)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    config = service.config
    assert config is not None, "configure() runs before kopf starts"
    settings.posting.enabled = False
    # No scanning of CRDs and namespaces: it would need cluster-wide list/watch on
    # both, and kopf watches no resource for us anyway.
    settings.scanning.disabled = True
    metrics = Metrics()
    # Called again on a 401, to pick up a rotated token.
    service.api = KubeApi(lambda: kube.login(settings))
    service.http = HttpClient(
        config.egress, max_body_bytes=config.max_body_bytes, max_connections=config.max_in_flight
    )
    ownership = None
    if config.leases is not None:
        ownership = Ownership(config.leases, scopes=config.namespaces or (None,))
    runtime = service.runtime = Runtime(
        config, service.api, service.http, metrics, ownership=ownership
    )
    runtime.start()
    informer = Informer(
        service.api,
        config.namespaces,
        config.labels,
        observe=runtime.observe,
        keep_only=runtime.keep_only,
        listing=ownership.listing if ownership is not None else None,
    )
    service.informer = asyncio.create_task(informer.run(), name="jobwatch-informer")
    if config.leases is not None and ownership is not None:
        elector = service.elector = Elector(
            config.leases,
            service.api,
            ownership,
            _Handover(runtime, informer),
            clock=time.monotonic,
            wall=time.time,
        )
        metrics.leases.source = elector.figures
        service.electing = asyncio.create_task(elector.run(), name="jobwatch-leases")
    service.starter = asyncio.create_task(_poll_when_synced(informer, runtime))
    if service.metrics_listener is not None:
        service.metrics_runner = await metrics.serve(service.metrics_listener)
    log.info(
        "jobwatch started: %s, %d requests in flight at most",
        "namespaces " + ", ".join(config.namespaces) if config.namespaces else "cluster-wide",
        config.max_in_flight,
    )


class _Handover:
    """The runtime and the informer, as the lease elector needs them."""

    def __init__(self, runtime: Runtime, informer: Informer) -> None:
        self._runtime, self._informer = runtime, informer

    def adopt(self) -> None:
        self._informer.relist()

    def drop(self, buckets: frozenset[int]) -> None:
        self._runtime.drop(buckets)

    async def hand_over(
        self, buckets: frozenset[int], budget: float
    ) -> dict[tuple[str, str], Handed]:
        return await self._runtime.hand_over(buckets, budget)


async def _poll_when_synced(informer: Informer, runtime: Runtime) -> None:
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
    # go on meanwhile. kopf then stops through `stop`. (kopf installs its handlers
    # while start-up runs; the listing's round trips come after that, so these win.)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)
    runtime.start_polling()
    log.info("polling %d watches; %d objects frozen", len(runtime.watches), gc.get_freeze_count())


def _on_signal(signum: int) -> None:
    if service.signalled_at is None:
        log.info("%s: stopping polls, then flushing status", signal.Signals(signum).name)
        service.signalled_at = asyncio.get_running_loop().time()
        if service.starter is not None:
            service.starter.cancel()  # polling must not start now
        if service.runtime is not None:
            service.stopping = asyncio.create_task(service.runtime.stop_polling())
    service.stop.set()


def configure(config: Config, metrics_listener: socket.socket | None) -> None:
    service.config = config
    service.metrics_listener = metrics_listener


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    # Stopped by kopf's own signal handler (before polling started): its waiter of
    # `stop` would otherwise count as a hung task, which kopf waits 5 s for.
    service.stop.set()
    for task in (service.starter, service.informer, service.electing):
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if service.runtime is not None and service.config is not None:
        budget = service.config.shutdown_budget - EXIT_RESERVE
        if service.signalled_at is not None:
            budget -= asyncio.get_running_loop().time() - service.signalled_at
        if service.elector is not None:
            if service.stopping is not None:
                await service.stopping  # no poll in flight any more
            # Hand every bucket over first (phase changes written, the timing in the
            # Leases) and leave the group: the other replicas take them at their next
            # round, seconds from now, not after an expiry. The flush below then has
            # nothing left of them to write.
            started = asyncio.get_running_loop().time()
            await service.elector.release(min(HANDOVER_BUDGET, budget / 2))
            budget -= asyncio.get_running_loop().time() - started
        await service.runtime.shutdown(max(1.0, budget))
    if service.http is not None:
        await service.http.aclose()
    if service.api is not None:
        await service.api.aclose()
    if service.metrics_runner is not None:
        await service.metrics_runner.cleanup()
    log.info("jobwatch stopped")
