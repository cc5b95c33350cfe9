"""The kopf handlers: thin, they start and stop the operator.

kopf runs the process: credentials, signals, start-up and clean-up (`/healthz` is
ours, served by __main__.py on a socket bound before kopf starts). What the handlers
share is kopf's `memo`, the `startup.Operator` __main__ hands to `kopf.operator`;
start-up fills it through `startup.build`. JobWatch events come from our own informer
(kube/informer.py), not from kopf's watching, which costs milliseconds of CPU per event (our
status echoes included) and took minutes to adopt 10k JobWatches. kopf's daemons and
timers would also have put a finalizer on every JobWatch (kopf issues #1074, #833): a
JobWatch, or its namespace, could then not be deleted while the operator is not
running. Nothing here adds one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from typing import Any

import kopf

from jobwatch.app.startup import Operator, build
from jobwatch.kube import login as kubelogin

log = logging.getLogger(__name__)
# Of the shutdown budget, what is kept for closing the clients and kopf's own exit
# after the status flush.
EXIT_RESERVE = 2.0
# At most this long from SIGTERM to the Leases released (the rest of the shutdown budget
# flushes what else is queued): other replicas take the buckets within seconds.
HANDOVER_BUDGET = 3.0


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login is ours (kubelogin.login), so that kopf's own, through the `kubernetes`
    package when it is installed, does not import it."""
    return kubelogin.login(settings)


@kopf.on.startup()
async def startup(memo: Operator, settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    # No scanning of CRDs and namespaces: it would need cluster-wide list/watch on
    # both, and kopf watches no resource for us anyway.
    settings.scanning.disabled = True
    try:
        memo.running = await build(
            memo.config, settings, memo.metrics_listener, functools.partial(_on_signal, memo)
        )
    except kopf.LoginError as exc:
        # Credentials that can never work (a server URL that is not http(s), a CA that
        # cannot be loaded): retrying every minute would hide it behind a live process.
        raise kopf.PermanentError(f"cannot use the cluster's credentials: {exc}") from None


def _on_signal(operator: Operator, signum: int) -> None:
    if operator.signalled_at is None:
        log.info("%s: stopping polls, then flushing status", signal.Signals(signum).name)
        operator.signalled_at = asyncio.get_running_loop().time()
        if operator.running is not None:
            operator.running.starter.cancel()  # polling must not start now
            operator.stopping = asyncio.create_task(operator.running.runtime.stop_polling())
    operator.stop.set()


@kopf.on.cleanup()
async def cleanup(memo: Operator, **_: Any) -> None:
    # Stopped by kopf's own signal handler (before polling started): its waiter of
    # `stop` would otherwise count as a hung task, which kopf waits 5 s for.
    memo.stop.set()
    running = memo.running
    if running is not None:
        for task in (running.starter, running.informer, running.electing):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        budget = memo.config.shutdown_budget - EXIT_RESERVE
        if memo.signalled_at is not None:
            budget -= asyncio.get_running_loop().time() - memo.signalled_at
        if running.elector is not None:
            if memo.stopping is not None:
                await memo.stopping  # no poll in flight any more
            # Hand every bucket over first (phase changes written, the timing in the
            # Leases) and leave the group: the other replicas take them at their next
            # round, seconds from now, not after an expiry. The flush below then has
            # nothing left of them to write.
            started = asyncio.get_running_loop().time()
            await running.elector.release(min(HANDOVER_BUDGET, budget / 2))
            budget -= asyncio.get_running_loop().time() - started
        await running.runtime.shutdown(max(1.0, budget))
        await running.http.aclose()
        await running.api.aclose()
        if running.metrics_runner is not None:
            await running.metrics_runner.cleanup()
    log.info("jobwatch stopped")
