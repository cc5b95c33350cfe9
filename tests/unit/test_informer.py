"""The informer's list-then-watch protocol, against a loopback stand-in for the API server.

That it really follows a live API server (creation, edits, deletion, restarts) is
tested end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from loopback_api import Drop, LoopbackApi, Seen, listing, reply, stream

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.jobservice.client import HttpClient
from jobwatch.jobservice.egress import EgressPolicy
from jobwatch.kits.metrics import Metrics
from jobwatch.kube import informer as informer_module
from jobwatch.kube.api import KubeApi
from jobwatch.kube.informer import Informer

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


async def run_until(informer: Informer, recorder: Recorder, count: int) -> None:
    task = asyncio.create_task(informer.run())
    try:
        await recorder.until(count)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_lists_then_watches_from_the_lists_version(server: LoopbackApi, api: KubeApi) -> None:
    watched_from: list[str] = []

    def answer(seen: Seen) -> web.Response:
        params = seen.query
        assert seen.path == COLLECTION
        if params.get("watch") != "true":
            return listing("10", jw("a", "9"), jw("b", "10"))
        watched_from.append(params["resourceVersion"])
        assert params["allowWatchBookmarks"] == "true"
        assert params["labelSelector"] == "shard=1"
        if len(watched_from) == 1:
            # A bookmark moves the resume point; the stream then ends (server timeout).
            return stream(("MODIFIED", jw("a", "11", 2)), ("BOOKMARK", jw("", "15")))
        return stream(("DELETED", jw("b", "16")))

    server.answer = answer
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
    server: LoopbackApi, api: KubeApi, expiry: str
) -> None:
    lists = 0

    def answer(seen: Seen) -> web.Response:
        nonlocal lists
        if seen.query.get("watch") != "true":
            lists += 1
            if lists == 1:
                return listing("10", jw("a", "9"), jw("b", "10"))
            return listing("30", jw("a", "9"))
        if lists == 1:
            if expiry == "http":
                return reply(410, {"message": "too old resource version"})
            return stream(("ERROR", {"kind": "Status", "code": 410, "message": "too old"}))
        return stream(("MODIFIED", jw("a", "31", 2)))

    server.answer = answer
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
    server: LoopbackApi, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(informer_module.asyncio, "sleep", sleep)
    answers = iter(
        [
            reply(500, {"message": "etcd is sad"}),
            reply(503, {"message": "still sad"}),
            listing("10", jw("a", "9")),
        ]
    )
    server.answer = lambda seen: next(answers, None) or stream(("MODIFIED", jw("a", "12", 2)))
    recorder = Recorder()
    informer = Informer(api, ("ns",), (), observe=recorder.observe, keep_only=recorder.keep_only)
    await run_until(informer, recorder, 2)
    assert recorder.events[:2] == [("ADDED", "a"), ("MODIFIED", "a")]
    assert len(delays) >= 2
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # doubling, with jitter


async def test_an_outage_and_the_start_up_after_it_are_retried_every_second(
    server: LoopbackApi, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(informer_module.asyncio, "sleep", sleep)
    # aiohttp sends a GET again, once, when the connection it reused closes unanswered:
    # 16 dropped connections are 8 to 16 attempts that get no answer.
    refused = [Drop()] * 16
    # What a restarted kube-apiserver answers in its first seconds.
    starting = [
        reply(503, {"message": "before all known HTTP paths have been installed"}),
        reply(429, {"message": "storage is (re)initializing"}),
        reply(403, {"message": "jobwatches.jobwatch.dev is forbidden"}),
    ]
    listed = listing("10")
    answers = iter([*refused, *starting, listed, reply(500), reply(500)])
    listed_after: list[int] = []  # how many pauses came before the listing was answered

    def answer(seen: Seen) -> web.Response:
        got = next(answers, None)
        if isinstance(got, Exception):
            raise got
        if got is listed:
            listed_after.append(len(delays))
        return got or stream(("ADDED", jw("a", "11")))

    server.answer = answer
    recorder = Recorder()
    informer = Informer(api, ("ns",), (), observe=recorder.observe, keep_only=recorder.keep_only)
    await run_until(informer, recorder, 2)
    [k] = listed_after
    assert k >= 8 + 3
    # A minute away, or its start-up, would otherwise have grown the backoff to 30 s.
    assert all(0.5 <= d <= informer_module.UNREACHABLE_RETRY for d in delays[:k]), delays
    # Once it has answered properly, errors back off again from the start.
    assert 0.5 <= delays[k] <= 1.0 and 1.0 <= delays[k + 1] <= 2.0, delays


async def test_a_relist_after_410_polls_nobody_anew(server: LoopbackApi, api: KubeApi) -> None:
    """A re-list hands every JobWatch in again: a watch it already has keeps its plan (and
    its state), or the whole fleet would be polled at once after every 410."""
    spec = {"url": "http://127.0.0.1:1/status", "interval": "5s"}
    names = [f"w{n}" for n in range(5)]
    lists = 0

    def answer(seen: Seen) -> web.Response:
        nonlocal lists
        if seen.query.get("watch") != "true":
            lists += 1
            # The second list carries our own status writes: new resourceVersions.
            return listing(
                f"{lists}0", *({**jw(n, f"{lists}{i}"), "spec": spec} for i, n in enumerate(names))
            )
        if lists == 1:
            return reply(410, {"message": "too old resource version"})
        return stream(("BOOKMARK", jw("", "99")))

    server.answer = answer
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
