"""The kopf handlers: thin, they hand events to the runtime.

Only `@kopf.on.event` is used. Daemons and timers would put a finalizer on
every JobWatch (kopf issues #1074, #833), and then a JobWatch could not be
deleted, nor its namespace, while the operator is not running.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass
from typing import Any

import kopf
from aiohttp import web

from .config import Config
from .httpclient import HttpClient
from .kube import GROUP, PLURAL, VERSION, KubeApi
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger(__name__)
FREEZE_QUIET_SECONDS = 3.0


@dataclass
class Service:
    """What the handlers share; filled at start-up."""

    config: Config | None = None
    runtime: Runtime | None = None
    api: KubeApi | None = None
    http: HttpClient | None = None
    metrics_runner: web.AppRunner | None = None
    freezer: asyncio.Task[None] | None = None
    # JobWatches kopf has delivered so far, until its initial listing is taken as done.
    delivered: set[tuple[str, str]] | None = None


service = Service()


def _credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    # The same login kopf does; called again on a 401 to pick up a rotated token.
    info = kopf.login_via_client(logger=log, settings=settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials found (in-cluster or KUBECONFIG)")
    return info


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    config = service.config
    assert config is not None, "configure() runs before kopf starts"
    # Our own status writes come back as watch events; kopf need not log them.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    # No runtime scanning of CRDs and namespaces: it would need cluster-wide
    # list/watch on both, and the CRD and the configured namespaces are
    # known at start-up.
    settings.scanning.disabled = True
    # On SIGTERM kopf gives its per-object workers this long before the clean-up
    # handler runs; what they would handle is only our own status echoes.
    settings.queueing.exit_timeout = 1.0
    metrics = Metrics()
    service.api = KubeApi(lambda: _credentials(settings))
    service.http = HttpClient(
        config.egress, max_body_bytes=config.max_body_bytes, max_connections=config.max_in_flight
    )
    service.runtime = Runtime(config, service.api, service.http, metrics)
    service.runtime.start()
    service.delivered = set()
    service.freezer = asyncio.create_task(_adopt_then_freeze(config, service.api, service.runtime))
    if config.metrics_port:
        service.metrics_runner = await metrics.serve(config.metrics_port)
    log.info(
        "jobwatch started: %s, %d requests in flight at most",
        "namespaces " + ", ".join(config.namespaces) if config.namespaces else "cluster-wide",
        config.max_in_flight,
    )


async def _adopt_then_freeze(config: Config, api: KubeApi, runtime: Runtime) -> None:
    await _adopt_existing(config, api, runtime)
    await _freeze_after_initial_listing(runtime)


async def _adopt_existing(config: Config, api: KubeApi, runtime: Runtime) -> None:
    """Starts every existing JobWatch from a paged LIST of our own, before kopf does.

    kopf hands its initial listing to its per-object workers one by one, and that
    competes for the CPU with the polls of the watches already started: at 10k
    JobWatches the last was adopted minutes after start-up. This list takes seconds.
    kopf's events for the same objects come later and are no-ops (same uid and
    generation); if this fails, kopf's listing still starts every watch.
    """
    started = asyncio.get_running_loop().time()
    adopted = 0
    try:
        for namespace in config.namespaces or (None,):
            async for page in api.list_jobwatches(namespace, config.labels):
                for body in page:
                    runtime.observe("ADDED", body)
                adopted += len(page)
    except Exception as exc:
        log.warning("initial listing failed (%s); kopf's own listing will start the watches", exc)
        return
    elapsed = asyncio.get_running_loop().time() - started
    log.info("initial listing: %d JobWatches adopted in %.1f s", adopted, elapsed)


async def _freeze_after_initial_listing(runtime: Runtime) -> None:
    """Moves what start-up built (thousands of watches, kopf's state) out of the GC's sight.

    Full collections otherwise walk every long-lived object again and again: at 10k
    watches that is a pause of over a second. kopf's initial listing is taken as done
    when it has delivered every watch we know of, or when it has delivered nothing
    new for a few seconds.
    """
    delivered = service.delivered
    assert delivered is not None
    seen = 0
    while not delivered or (len(delivered) < len(runtime.watches) and len(delivered) != seen):
        seen = len(delivered)
        await asyncio.sleep(FREEZE_QUIET_SECONDS)
    service.delivered = None
    gc.collect()
    gc.freeze()
    log.info(
        "initial listing done: %d watches; %d objects frozen",
        len(runtime.watches),
        gc.get_freeze_count(),
    )


async def jobwatch_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    assert service.runtime is not None
    if service.delivered is not None:
        meta = body.get("metadata") or {}
        service.delivered.add((str(meta.get("namespace")), str(meta.get("name"))))
    service.runtime.observe(type, body)


def configure(config: Config) -> None:
    """Registers the event handler; with a label selector, for this shard's JobWatches only."""
    service.config = config
    labels = dict(config.labels) or None
    kopf.on.event(GROUP, VERSION, PLURAL, labels=labels)(jobwatch_event)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if service.freezer is not None:
        service.freezer.cancel()
    if service.runtime is not None and service.config is not None:
        # The rest of the budget is kopf's: stopping its watches and workers before
        # this handler runs, and closing its sessions after.
        await service.runtime.shutdown(max(1.0, service.config.shutdown_budget - 5))
    if service.http is not None:
        await service.http.aclose()
    if service.api is not None:
        await service.api.aclose()
    if service.metrics_runner is not None:
        await service.metrics_runner.cleanup()
    log.info("jobwatch stopped")
