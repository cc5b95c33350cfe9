"""The informer's list-then-watch protocol, with respx in place of the API server.

That it really follows a live API server (creation, edits, deletion, restarts) is
tested end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import kopf
import pytest
import respx

from jobwatch import informer as informer_module
from jobwatch.informer import Informer
from jobwatch.kube import KubeApi

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
