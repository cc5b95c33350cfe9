"""`python -m jobwatch`: run the operator. Configuration: environment variables (app/config.py)."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import kopf
import uvloop
from aiohttp import web

from jobwatch.app import handlers  # noqa: F401  # registers the kopf handlers
from jobwatch.app.config import Config, ConfigError, log_settings_from_env
from jobwatch.app.startup import Operator
from jobwatch.kits import endpoints, logs
from jobwatch.kits.logs import LogFormat, LogSettings

# Every interface: the kubelet probes the pod's IP, and Prometheus scrapes it.
LISTEN_HOST = "0.0.0.0"
log = logging.getLogger("jobwatch")


class ListenError(Exception):
    pass


def listen(variable: str, port: int) -> socket.socket | None:
    """The listening socket of one endpoint (None for port 0: no endpoint).

    Bound here, before kopf starts, so that a port that is taken or not allowed stops
    the process at once with one line naming the variable. Bound later, inside kopf, it
    was a traceback, and an operator that went on running without polling.
    """
    if port == 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As aiohttp's own sites do: a restarted operator must not wait for the old
        # one's connections to leave TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LISTEN_HOST, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        raise ListenError(
            f"{variable}={port}: cannot listen on {LISTEN_HOST}:{port}: {reason}"
            " (set another port, or 0 for no endpoint)"
        ) from None
    sock.setblocking(False)
    return sock


async def serve_health(listener: socket.socket, problem: Callable[[], str | None]) -> web.AppRunner:
    """/healthz: that it answers at all is most of the news (the event loop runs); a
    long-lived part of the operator that has stopped (the informer, the status writer;
    `problem` names it) makes it 503, so that the kubelet restarts a process that can no
    longer see or report JobWatches."""

    async def healthz(_: web.Request) -> web.Response:
        why = problem()
        response = web.Response(text=f"{why}\n", status=503) if why else web.Response(text="ok\n")
        # No idle keep-alive connection, whose handler task kopf would wait for at exit.
        response.force_close()
        return response

    return await endpoints.serve(listener, "/healthz", healthz)


async def operate(operator: Operator, health: socket.socket | None) -> None:
    config = operator.config
    runner = await serve_health(health, operator.problem) if health is not None else None
    try:
        await kopf.operator(
            memo=operator,
            stop_flag=operator.stop,
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def _stop(settings: LogSettings, message: str, code: int) -> NoReturn:
    """Start-up failure: one line on stderr, a JSON one when the logs are JSON."""
    if settings.format is LogFormat.JSON:
        log.critical("%s", message)
    else:
        print(f"jobwatch: {message}", file=sys.stderr)
    raise SystemExit(code)


def quiet_libraries() -> None:
    """Lowers what the libraries log on their own to what is news to an operator."""
    # kopf logs every event handler call at INFO: at thousands of watches that
    # is mostly our own status echoes.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # httpx logs every API request at INFO: thousands a minute, and no news.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # cel-python's compiled runner logs every evaluation error at ERROR, with values from
    # the response in it; an expression that does not match a response is routine, not
    # an operator fault.
    logging.getLogger("celpy.Transpiler").setLevel(logging.CRITICAL)
    # It also logs every expression it transpiles at INFO: one line per watch at start-up.
    logging.getLogger("celpy").setLevel(logging.WARNING)


def main() -> None:
    try:
        log_settings = log_settings_from_env()
    except ConfigError as exc:
        print(f"jobwatch: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.setup(log_settings)
    quiet_libraries()
    try:
        config = Config.from_env()
    except ConfigError as exc:
        _stop(log_settings, f"bad configuration: {exc}", 2)
    try:
        health = listen("JOBWATCH_HEALTH_PORT", config.health_port)
        metrics = listen("JOBWATCH_METRICS_PORT", config.metrics_port)
    except ListenError as exc:
        _stop(log_settings, str(exc), 1)
    operator = Operator(config, metrics)
    # CEL expressions that iterate run on a thread of their own (core/expressions.py) and hold
    # the GIL between switches: 1 ms instead of 5 ms lets the event loop in five times as
    # often (measured: longest loop pause 12.8 -> 6.3 ms during a 10k-item `exists`).
    sys.setswitchinterval(0.001)
    uvloop.new_event_loop().run_until_complete(operate(operator, health))


if __name__ == "__main__":
    main()
