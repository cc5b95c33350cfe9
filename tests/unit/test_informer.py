"""The informer's list-then-watch protocol, with respx in place of the API server.

That it really follows a live API server (creation, edits, deletion, restarts) is
tested end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import kopf
import pytest
import respx

from jobwatch import informer as informer_module
from jobwatch.config import Config
from jobwatch.egress import EgressPolicy
from jobwatch.httpclient import HttpClient
from jobwatch.informer import Informer
from jobwatch.kube import KubeApi
from jobwatch.metrics import Metrics
from jobwatch.runtime import Runtime

SERVER = "https://api.test:6443"
COLLECTION = "/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches"


def jw(name: str, version: str, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "uid": f"uid-{name}",
            "generation": generation,
            "resourceVersion": version,
        }
    }


def listing(version: str, *items: dict[str, Any]) -> httpx.Response:
    return httpx.Response(
        200, json={"items": list(items), "metadata": {"resourceVersion": version}}
    )


def stream(*events: tuple[str, dict[str, Any]]) -> httpx.Response:
    lines = "".join(json.dumps({"type": kind, "object": obj}) + "\n" for kind, obj in events)
    return httpx.Response(200, content=lines.encode())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.kept: list[tuple[str | None, set[tuple[str, str]]]] = []
        self.changed = asyncio.Event()

    def observe(self, kind: str, body: Mapping[str, Any]) -> None:
        self.events.append((kind, body["metadata"]["name"]))
        self.changed.set()

    def keep_only(self, namespace: str | None, keys: set[tuple[str, str]]) -> None:
        self.kept.append((namespace, keys))

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(autouse=True)
def short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The mocked streams end at once; the informer pauses after such a stream.
    monkeypatch.setattr(informer_module, "MIN_STREAM_SECONDS", 0.01)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=SERVER, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    client = KubeApi(lambda: kopf.ConnectionInfo(server=SERVER, token="t", insecure=True))
    yield client
    await client.aclose()


async def run_until(informer: Informer, recorder: Recorder, count: int) -> None:
    task = asyncio.create_task(informer.run())
    try:
        await recorder.until(count)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_lists_then_watches_from_the_lists_version(
    router: respx.MockRouter, api: KubeApi
) -> None:
    watched_from: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        params = request.url.params
        if params.get("watch") != "true":
            return listing("10", jw("a", "9"), jw("b", "10"))
        watched_from.append(params["resourceVersion"])
        assert params["allowWatchBookmarks"] == "true"
        assert params["labelSelector"] == "shard=1"
        if len(watched_from) == 1:
            # A bookmark moves the resume point; the stream then ends (server timeout).
            return stream(("MODIFIED", jw("a", "11", 2)), ("BOOKMARK", jw("", "15")))
        return stream(("DELETED", jw("b", "16")))

    router.get(COLLECTION).mock(side_effect=answer)
    recorder = Recorder()
    informer = Informer(
        api, ("ns",), (("shard", "1"),), observe=recorder.observe, keep_only=recorder.keep_only
    )
    await run_until(informer, recorder, 4)
    assert recorder.events[:4] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert watched_from[:2] == ["10", "15"]  # resumed after the bookmark, not re-listed
    assert recorder.kept == [("ns", {("ns", "a"), ("ns", "b")})]
    assert informer.synced.is_set()


@pytest.mark.parametrize("expiry", ["http", "event"])
async def test_an_expired_watch_lists_again_and_forgets_what_is_gone(
    router: respx.MockRouter, api: KubeApi, expiry: str
) -> None:
    lists = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal lists
        if request.url.params.get("watch") != "true":
            lists += 1
            if lists == 1:
                return listing("10", jw("a", "9"), jw("b", "10"))
            return listing("30", jw("a", "9"))
        if lists == 1:
            if expiry == "http":
                return httpx.Response(410, json={"message": "too old resource version"})
            return stream(("ERROR", {"kind": "Status", "code": 410, "message": "too old"}))
        return stream(("MODIFIED", jw("a", "31", 2)))

    router.get(COLLECTION).mock(side_effect=answer)
    recorder = Recorder()
    informer = Informer(api, ("ns",), (), observe=recorder.observe, keep_only=recorder.keep_only)
    await run_until(informer, recorder, 4)
    assert recorder.events[:4] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "a"),
        ("MODIFIED", "a"),
    ]
    assert recorder.kept[:2] == [("ns", {("ns", "a"), ("ns", "b")}), ("ns", {("ns", "a")})]


async def test_errors_back_off_and_recover(
    router: respx.MockRouter, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(informer_module.asyncio, "sleep", sleep)
    answers = iter(
        [
            httpx.Response(500, json={"message": "etcd is sad"}),
            httpx.Response(503, json={"message": "still sad"}),
            listing("10", jw("a", "9")),
        ]
    )
    router.get(COLLECTION).mock(
        side_effect=lambda request: next(answers, None) or stream(("MODIFIED", jw("a", "12", 2)))
    )
    recorder = Recorder()
    informer = Informer(api, ("ns",), (), observe=recorder.observe, keep_only=recorder.keep_only)
    await run_until(informer, recorder, 2)
    assert recorder.events[:2] == [("ADDED", "a"), ("MODIFIED", "a")]
    assert len(delays) >= 2
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # doubling, with jitter


async def test_an_outage_and_the_start_up_after_it_are_retried_every_second(
    router: respx.MockRouter, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(informer_module.asyncio, "sleep", sleep)
    refused = [httpx.ConnectError("connection refused")] * 8
    # What a restarted kube-apiserver answers in its first seconds.
    starting = [
        httpx.Response(503, json={"message": "before all known HTTP paths have been installed"}),
        httpx.Response(429, json={"message": "storage is (re)initializing"}),
        httpx.Response(403, json={"message": "jobwatches.jobwatch.dev is forbidden"}),
    ]
    answers = iter([*refused, *starting, listing("10"), httpx.Response(500), httpx.Response(500)])

    def answer(request: httpx.Request) -> httpx.Response:
        got = next(answers, None)
        if isinstance(got, Exception):
            raise got
        return got or stream(("ADDED", jw("a", "11")))

    router.get(COLLECTION).mock(side_effect=answer)
    recorder = Recorder()
    informer = Informer(api, ("ns",), (), observe=recorder.observe, keep_only=recorder.keep_only)
    await run_until(informer, recorder, 2)
    # A minute away, or its start-up, would otherwise have grown the backoff to 30 s.
    assert all(0.5 <= d <= informer_module.UNREACHABLE_RETRY for d in delays[:11]), delays
    # Once it has answered properly, errors back off again from the start.
    assert 0.5 <= delays[11] <= 1.0 and 1.0 <= delays[12] <= 2.0, delays


async def test_a_relist_after_410_polls_nobody_anew(router: respx.MockRouter, api: KubeApi) -> None:
    """A re-list hands every JobWatch in again: a watch it already has keeps its plan (and
    its state), or the whole fleet would be polled at once after every 410."""
    spec = {"url": "http://127.0.0.1:1/status", "interval": "5s"}
    names = [f"w{n}" for n in range(5)]
    lists = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal lists
        if request.url.params.get("watch") != "true":
            lists += 1
            # The second list carries our own status writes: new resourceVersions.
            return listing(
                f"{lists}0", *({**jw(n, f"{lists}{i}"), "spec": spec} for i, n in enumerate(names))
            )
        if lists == 1:
            return httpx.Response(410, json={"message": "too old resource version"})
        return stream(("BOOKMARK", jw("", "99")))

    router.get(COLLECTION).mock(side_effect=answer)
    ticks = itertools.count(1_800_000_000)  # every reading of the wall clock moves it
    http = HttpClient(EgressPolicy())
    runtime = Runtime(Config.from_env({}), api, http, Metrics(), wall=lambda: float(next(ticks)))
    recorder = Recorder()

    def observe(kind: str, body: Mapping[str, Any]) -> None:
        runtime.observe(kind, body)
        recorder.observe(kind, body)

    informer = Informer(api, ("ns",), (), observe=observe, keep_only=runtime.keep_only)
    first: dict[tuple[str, str], tuple[object, float | None]] = {}

    def plans() -> dict[tuple[str, str], tuple[object, float | None]]:
        return {key: (watch, watch.next_poll_time) for key, watch in runtime.watches.items()}

    task = asyncio.create_task(informer.run())
    try:
        await recorder.until(len(names))
        first = plans()
        await recorder.until(2 * len(names))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runtime.scheduler.stop()
        await http.aclose()
    assert lists == 2
    assert len(first) == len(names)
    assert plans() == first  # the same watch objects, each with the poll planned before
