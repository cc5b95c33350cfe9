"""Stand-ins for the runtime's tests: the API server and the job service as the runtime
uses them, recording what they are sent so that each step can be made to fail on
purpose; a running runtime on them, and waiting that checks the fleet's invariant.

The runtime in these tests is the real one (scheduler, status writer, policy, CEL).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.core.outcome import Outcome, Response
from jobwatch.core.patch import Fence
from jobwatch.core.refs import ObjectRef
from jobwatch.jobservice.client import Request
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import Secret

END = ("Succeeded", "Failed", "TimedOut")
# Short enough that a deadline ends each test within about a second.
FAST = {"interval": "100ms", "timeout": "1s", "backoff": {"maxInterval": "100ms"}}


class FakeApi:
    """The API server as the runtime uses it: status patches, Events, Secret reads."""

    def __init__(self) -> None:
        self.statuses: dict[str, list[dict[str, Any]]] = {}
        self.secret: Callable[[], Awaitable[Secret | None]] | None = None

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        self.statuses.setdefault(ref.name, []).append(status)

    async def create_event(self, ref: ObjectRef, **_: Any) -> None:
        pass

    async def read_jobwatch(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        assert self.secret is not None
        return await self.secret()

    def last(self, name: str) -> dict[str, Any]:
        return (self.statuses.get(name) or [{}])[-1]

    def ended(self, name: str) -> bool:
        return self.last(name).get("phase") in END

    def error_classes(self, name: str) -> set[str]:
        return {s["lastError"]["class"] for s in self.statuses.get(name, []) if s.get("lastError")}


class FakeHttp:
    """The job service: answers `pending` for every watch unless `send_fault` is set."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.body = '{"status": "RUNNING"}'
        self.send_fault: Exception | None = None
        self.faulty_url = ""

    async def send(self, request: Request) -> Outcome:
        self.sent[request.url] = self.sent.get(request.url, 0) + 1
        if self.send_fault is not None and request.url == self.faulty_url:
            raise self.send_fault
        return Response(code=200, headers={}, text=self.body, latency_ms=1)


def jobwatch(name: str, **spec: Any) -> dict[str, Any]:
    meta = {"namespace": "ns", "name": name, "uid": f"uid-{name}", "generation": 1}
    body = {
        "url": f"http://jobs.test/{name}",
        "successWhen": 'response.body.status == "DONE"',
        **FAST,
        **spec,
    }
    return {"metadata": meta, "spec": body}


SECRET_HEADER = {
    "headers": [{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
}

Env = tuple[Runtime, FakeApi, FakeHttp]


@pytest.fixture(name="env")
async def running_env() -> AsyncIterator[Env]:
    """The `env` fixture of the runtime's tests (imported by them): a runtime polling (a
    single replica), on a fresh API server and job service."""
    async with polling(FakeHttp()) as env:
        yield env


@contextlib.asynccontextmanager
async def polling(http: FakeHttp) -> AsyncIterator[Env]:
    """A runtime polling (a single replica) on a fresh API server and the job service
    `http`."""
    api = FakeApi()
    config = Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000"})
    runtime = Runtime(config, api, http, Metrics())  # type: ignore[arg-type]
    runtime.start()
    runtime.start_polling()
    try:
        yield runtime, api, http
    finally:
        await runtime.shutdown(1.0)


async def until(
    predicate: Callable[[], bool], env: Env | None = None, timeout: float = 5.0
) -> None:
    """Waits for `predicate`, checking the invariant at every step meanwhile."""
    async with asyncio.timeout(timeout):
        while not predicate():
            if env is not None:
                assert_invariant(env[0])
            await asyncio.sleep(0.005)


def assert_invariant(runtime: Runtime) -> None:
    for key, watch in runtime.watches.items():
        assert watch.finished or runtime.scheduler.planned(key), f"{key} has no next poll"


async def until_ended(env: Env, name: str) -> dict[str, Any]:
    await until(lambda: env[1].ended(name), env)
    return env[1].last(name)


def raising(exc: BaseException) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise exc

    return fail


class Slow(FakeHttp):
    """The first poll of a watch answers; the next one hangs until `go` (or is cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.go = asyncio.Event(), asyncio.Event()
        self.cut = self.started = 0

    async def send(self, request: Request) -> Outcome:
        self.started += 1
        if self.sent.get(request.url):
            self.out.set()
            try:
                await self.go.wait()
            except asyncio.CancelledError:
                self.cut += 1  # the client closes the request's socket here
                raise
        return await super().send(request)


def one_bucket(valid_for: float) -> Ownership:
    """A replica's hold, for `valid_for` seconds from now, on the one bucket of a
    one-bucket group, its objects listed."""
    ownership = Ownership(LeaseSettings("ops", "r0", buckets=1), scopes=[None])
    ownership.take(0, time.monotonic() + valid_for, {})
    ownership.listing(None)
    return ownership


@contextlib.asynccontextmanager
async def replica(http: FakeHttp, valid_for: float = 60.0) -> AsyncIterator[Runtime]:
    """A runtime holding the one bucket of a one-bucket group."""
    ownership = one_bucket(valid_for)
    config = Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000"})
    runtime = Runtime(config, FakeApi(), http, Metrics(), ownership=ownership)  # type: ignore[arg-type]
    runtime.start()
    runtime.start_polling()
    try:
        yield runtime
    finally:
        await runtime.shutdown(1.0)
