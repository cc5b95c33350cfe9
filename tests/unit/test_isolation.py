"""Fault injection at every seam of a watch's life: whatever step raises, the watch keeps a
planned next poll or ends, with the error in its status, and no other watch notices.

The runtime here is the real one (scheduler, status writer, policy, CEL); the API server
and the job service are stand-ins that record what they are sent, so each step can be
made to fail on purpose. What users see of the same faults end to end is in
tests/e2e/test_hostile_tenants.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from jobwatch import policy
from jobwatch import runtime as runtime_module
from jobwatch import status_render as status_module
from jobwatch.config import Config
from jobwatch.expressions import CompiledWatch
from jobwatch.handover import Handed
from jobwatch.httpclient import Request
from jobwatch.kube import ApiError, Fence, ObjectRef, Secret
from jobwatch.leases import LeaseSettings
from jobwatch.metrics import Metrics
from jobwatch.outcome import Outcome, Response
from jobwatch.ownership import Ownership
from jobwatch.runtime import Runtime
from jobwatch.spec import spec_hash
from jobwatch.watch import Watch

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


Env = tuple[Runtime, FakeApi, FakeHttp]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    api, http = FakeApi(), FakeHttp()
    config = Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000"})
    runtime = Runtime(config, api, http, Metrics())  # type: ignore[arg-type]
    runtime.start()
    runtime.start_polling()
    yield runtime, api, http
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


async def ends_with_the_error(env: Env, name: str, error_class: str) -> dict[str, Any]:
    """The watch `name` ends (the deadline at the latest), its error visible on the way,
    while a healthy neighbour keeps polling."""
    runtime, api, http = env
    runtime.observe("ADDED", jobwatch("neighbour", timeout="1m"))
    await until(lambda: api.ended(name), env)
    assert error_class in api.error_classes(name)
    polled = http.sent.get("http://jobs.test/neighbour", 0)
    await until(lambda: http.sent.get("http://jobs.test/neighbour", 0) > polled + 2, env)
    assert not api.ended("neighbour")
    return api.last(name)


@pytest.fixture
def patch() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield monkeypatch


def raising(exc: BaseException) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise exc

    return fail


# --- each step of a poll ---------------------------------------------------------------


async def test_a_crash_while_sending_is_an_internal_error_until_the_deadline(env: Env) -> None:
    runtime, _, http = env
    http.send_fault, http.faulty_url = RuntimeError("boom"), "http://jobs.test/w"
    runtime.observe("ADDED", jobwatch("w"))
    final = await ends_with_the_error(env, "w", "Internal")
    assert final["phase"] == "TimedOut"


async def test_internal_errors_count_towards_max_consecutive_errors(env: Env) -> None:
    runtime, _api, http = env
    http.send_fault, http.faulty_url = RuntimeError("boom"), "http://jobs.test/w"
    runtime.observe("ADDED", jobwatch("w", maxConsecutiveErrors=3, timeout="1m"))
    final = await ends_with_the_error(env, "w", "Internal")
    assert (final["phase"], final["reason"]) == ("Failed", "TooManyErrors")
    assert final["lastError"]["class"] == "Internal"
    assert "internal error while sending the request (RuntimeError)" in final["message"]


@pytest.mark.parametrize(
    "target",
    [
        (Response, "body", property(raising(RecursionError("deep")))),
        (CompiledWatch, "judge", raising(ValueError("judge"))),
        (policy, "decide", raising(KeyError("decide"))),
        (Watch, "record_response", raising(MemoryError())),
    ],
    ids=["body", "judge", "decide", "record"],
)
async def test_a_crash_judging_the_response_is_an_internal_error(
    env: Env, patch: pytest.MonkeyPatch, target: tuple[Any, str, Any]
) -> None:
    patch.setattr(*target)
    env[0].observe("ADDED", jobwatch("w"))
    final = await until_ended(env, "w")
    assert final["phase"] == "TimedOut"
    assert "Internal" in env[1].error_classes("w")


async def until_ended(env: Env, name: str) -> dict[str, Any]:
    await until(lambda: env[1].ended(name), env)
    return env[1].last(name)


SECRET_HEADER = {
    "headers": [{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
}


@pytest.mark.parametrize(
    "fault",
    [ApiError(429, "slow down"), ApiError(503, "unavailable"), httpx.ReadTimeout("timed out")],
    ids=["429", "503", "timeout"],
)
async def test_a_secret_that_cannot_be_read_is_a_transient_error(
    env: Env, fault: Exception
) -> None:
    runtime, api, http = env

    async def secret() -> Secret | None:
        raise fault

    api.secret = secret
    runtime.observe("ADDED", jobwatch("w", **SECRET_HEADER))
    final = await ends_with_the_error(env, "w", "Transient")
    assert final["phase"] == "TimedOut"
    reasons = {s["reason"] for s in api.statuses["w"]}
    assert "SecretUnavailable" in reasons
    assert http.sent.get("http://jobs.test/w", 0) == 0  # nothing sent without the header


async def test_a_secret_read_that_crashes_is_a_transient_error(env: Env) -> None:
    runtime, api, _ = env
    api.secret = raising(RuntimeError("inside the client"))
    runtime.observe("ADDED", jobwatch("w", **SECRET_HEADER))
    assert (await until_ended(env, "w"))["phase"] == "TimedOut"
    assert "Transient" in api.error_classes("w")


# --- ending ----------------------------------------------------------------------------


async def test_a_result_that_crashes_leaves_the_end_standing(
    env: Env, patch: pytest.MonkeyPatch
) -> None:
    runtime, _api, http = env
    patch.setattr(runtime_module, "final_result", raising(RuntimeError("result")))
    http.body = '{"status": "DONE"}'
    runtime.observe("ADDED", jobwatch("w"))
    final = await until_ended(env, "w")
    assert final["phase"] == "Succeeded"
    assert "result not evaluated (RuntimeError)" in final["message"]


async def test_a_status_that_cannot_be_rendered_is_still_written(
    env: Env, patch: pytest.MonkeyPatch
) -> None:
    runtime, _api, http = env
    patch.setattr(status_module, "render", raising(ValueError("render")))
    http.body = '{"status": "DONE"}'
    runtime.observe("ADDED", jobwatch("w"))
    final = await until_ended(env, "w")
    assert final["phase"] == "Succeeded"
    assert "status could not be rendered (ValueError)" in final["message"]


async def test_a_big_deciding_body_still_gives_its_result(env: Env) -> None:
    """The result comes from the deciding response whatever its size within the cap."""
    runtime, _api, http = env
    http.body = '{"status": "DONE", "link": "s3://r", "pad": "' + "x" * 50_000 + '"}'
    runtime.observe("ADDED", jobwatch("w", result={"link": "response.body.link"}))
    final = await until_ended(env, "w")
    assert final["phase"] == "Succeeded"
    assert final["result"] == {"link": "s3://r"}


async def test_a_final_body_with_non_finite_numbers_is_written(env: Env) -> None:
    runtime, _api, http = env
    http.body = '{"status": "DONE", "score": NaN, "big": 1e400}'
    runtime.observe("ADDED", jobwatch("w", successWhen="response.code == 200"))
    final = await until_ended(env, "w")
    assert final["phase"] == "Succeeded"
    status_module.json.dumps(final, allow_nan=False)  # what the API server receives


# --- taking objects in -------------------------------------------------------------------


async def test_an_object_the_parser_crashes_on_fails_as_invalid_spec(
    env: Env, patch: pytest.MonkeyPatch
) -> None:
    runtime, _api, _ = env
    real = runtime_module.parse_spec

    def parse(raw: Any) -> Any:
        if raw.get("url", "").endswith("/bad"):
            raise IndexError("parser bug")
        return real(raw)

    patch.setattr(runtime_module, "parse_spec", parse)
    runtime.observe("ADDED", jobwatch("bad"))
    runtime.observe("ADDED", jobwatch("good", timeout="1m"))
    final = await until_ended(env, "bad")
    assert (final["phase"], final["reason"]) == ("Failed", "InvalidSpec")
    assert "spec could not be parsed (IndexError)" in final["message"]
    await until(lambda: env[2].sent.get("http://jobs.test/good", 0) > 0, env)


async def test_an_object_that_cannot_be_taken_in_gets_a_status_saying_so(
    env: Env, patch: pytest.MonkeyPatch
) -> None:
    runtime, _api, http = env
    patch.setattr(Watch, "resume_from", raising(RuntimeError("resume")))
    body = jobwatch("w")
    body["status"] = {"specHash": spec_hash(body["spec"]), "startTime": "2026-01-01T00:00:00Z"}
    runtime.observe("ADDED", body)  # must not raise: the informer would replay it forever
    final = await until_ended(env, "w")
    assert (final["phase"], final["reason"]) == ("Failed", "InternalError")
    assert final["lastError"]["class"] == "Internal"
    runtime.observe("ADDED", jobwatch("next", timeout="1m"))  # the stream moves on
    await until(lambda: http.sent.get("http://jobs.test/next", 0) > 0, env)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"metadata": None},
        {"metadata": {"name": "x", "namespace": "ns", "generation": "many"}},
        {"metadata": {"name": "x", "namespace": "ns", "uid": "u"}, "spec": "not a map"},
        {"metadata": {"name": "x", "namespace": "ns", "uid": "u"}, "spec": {"url": 7}},
        {
            "metadata": {"name": "x", "namespace": "ns", "uid": "u"},
            "spec": {"url": "http://a/"},
            "status": {"specHash": [], "attempts": "x", "conditions": [1, None]},
        },
    ],
)
async def test_observe_never_raises(env: Env, body: dict[str, Any]) -> None:
    env[0].observe("ADDED", body)
    assert_invariant(env[0])


# --- timing ---------------------------------------------------------------------------


async def test_an_edit_during_a_request_waits_for_it(env: Env) -> None:
    """At most one request per watch in flight, whatever edits arrive meanwhile."""
    runtime, _api, _ = env
    in_flight = 0
    overlaps = 0
    requests = 0
    release = asyncio.Event()

    class SlowHttp(FakeHttp):
        async def send(self, request: Request) -> Outcome:
            nonlocal in_flight, overlaps, requests
            overlaps += in_flight > 0
            in_flight += 1
            requests += 1
            try:
                if requests == 1:
                    await release.wait()
                return await super().send(request)
            finally:
                in_flight -= 1

    runtime._http = SlowHttp()
    body = jobwatch("w", timeout="1m", interval="1s")
    runtime.observe("ADDED", body)
    await until(lambda: requests == 1)
    for generation, suspend in ((2, True), (3, False)):  # suspend and resume mid-request
        body = {**body, "metadata": {**body["metadata"], "generation": generation}}
        body["spec"] = {**body["spec"], "suspend": suspend}
        runtime.observe("MODIFIED", body)
    edited = {**body, "metadata": {**body["metadata"], "generation": 4}}
    edited["spec"] = {**body["spec"], "successWhen": "false"}  # a new watch
    runtime.observe("MODIFIED", edited)
    await asyncio.sleep(0.3)
    assert requests == 1  # the new watch's first poll waits for the request out
    release.set()
    await until(lambda: requests == 2)
    assert overlaps == 0


async def test_a_resume_right_after_a_request_keeps_the_interval(env: Env) -> None:
    runtime, _, http = env
    body = jobwatch("w", timeout="1m", interval="500ms", backoff={"jitter": "None"})
    runtime.observe("ADDED", body)
    await until(lambda: http.sent.get("http://jobs.test/w", 0) == 1)
    first = time.monotonic()
    for generation, suspend in ((2, True), (3, False)):
        body = {**body, "metadata": {**body["metadata"], "generation": generation}}
        body["spec"] = {**body["spec"], "suspend": suspend}
        runtime.observe("MODIFIED", body)
    await until(lambda: http.sent.get("http://jobs.test/w", 0) == 2)
    assert time.monotonic() - first >= 0.45


async def test_a_spec_edit_right_after_a_request_keeps_the_floor(env: Env) -> None:
    """An edit starts a new watch of the same object; its first request still comes no
    sooner than the floor after the old watch's last one ended."""
    runtime, _, http = env
    body = jobwatch("w", timeout="1m", interval="500ms", backoff={"jitter": "None"})
    runtime.observe("ADDED", body)
    await until(lambda: http.sent.get("http://jobs.test/w", 0) == 1)
    first = time.monotonic()
    edited = {**body, "metadata": {**body["metadata"], "generation": 2}}
    edited["spec"] = {**body["spec"], "successWhen": 'response.body.status == "OVER"'}
    runtime.observe("MODIFIED", edited)
    await until(lambda: http.sent.get("http://jobs.test/w", 0) == 2)
    assert time.monotonic() - first >= 0.45


async def test_an_edit_during_a_request_waits_the_floor_after_it(env: Env) -> None:
    """The new watch's first poll was planned while the old request was out: it starts
    no sooner than the floor after that request ended (found by the soak benchmark)."""
    runtime, _, _ = env
    ended: list[float] = []
    started: list[float] = []
    release = asyncio.Event()

    class SlowHttp(FakeHttp):
        async def send(self, request: Request) -> Outcome:
            started.append(time.monotonic())
            if len(started) == 1:
                await release.wait()
            try:
                return await super().send(request)
            finally:
                ended.append(time.monotonic())

    runtime._http = SlowHttp()
    body = jobwatch("w", timeout="1m", interval="500ms", backoff={"jitter": "None"})
    runtime.observe("ADDED", body)
    await until(lambda: len(started) == 1)
    edited = {**body, "metadata": {**body["metadata"], "generation": 2}}
    edited["spec"] = {**body["spec"], "successWhen": 'response.body.status == "OVER"'}
    runtime.observe("MODIFIED", edited)
    await asyncio.sleep(0.05)
    release.set()
    await until(lambda: len(started) == 2, env)
    assert started[1] - ended[0] >= 0.45, started[1] - ended[0]


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


@contextlib.asynccontextmanager
async def replica(http: FakeHttp, valid_for: float = 60.0) -> AsyncIterator[Runtime]:
    """A runtime holding the one bucket of a one-bucket group."""
    settings = LeaseSettings("ops", "r0", buckets=1)
    ownership = Ownership(settings, scopes=[None])
    config = Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000"})
    runtime = Runtime(config, FakeApi(), http, Metrics(), ownership=ownership)  # type: ignore[arg-type]
    ownership.take(0, time.monotonic() + valid_for, {})
    ownership.listing(None)
    runtime.start()
    runtime.start_polling()
    try:
        yield runtime
    finally:
        await runtime.shutdown(1.0)


async def test_a_handover_cuts_the_request_still_out_and_hands_since_when() -> None:
    # The handover waits only so long for polls in flight. A request still out then is
    # cut (its socket closed): left open, the job service would be working on it while
    # the next holder's first request arrives. Its start goes with the handover.
    http = Slow()
    async with replica(http) as runtime:
        ownership = runtime._ownership
        assert ownership is not None
        runtime.observe("ADDED", jobwatch("w"))
        await asyncio.wait_for(http.out.wait(), 5)
        sent = runtime.watches[("ns", "w")].last_poll_time
        ownership.releasing(0)
        started = time.time()
        handed = await runtime.hand_over(frozenset({0}), budget=0.05)
        assert http.cut == 1
        timing = handed[("ns", "w")]
        assert timing.in_flight_since == sent
        assert timing.last_end is not None and timing.last_end >= started


async def test_a_request_is_cut_when_the_hold_on_its_bucket_ends() -> None:
    http = Slow()
    async with replica(http, valid_for=0.5) as runtime:
        runtime.observe("ADDED", jobwatch("w", requestTimeout="30s", timeout="1h"))
        await asyncio.wait_for(http.out.wait(), 5)
        started = time.monotonic()
        await until(lambda: http.cut == 1, timeout=2.0)
        assert time.monotonic() - started < 0.6
        # Lapsed: no request since (the elector parks the bucket at its next round).
        await asyncio.sleep(0.3)
        assert http.started == 2


async def test_the_taker_waits_for_a_request_the_previous_holder_may_still_have_open() -> None:
    settings = LeaseSettings("ops", "r1", buckets=1)
    ownership = Ownership(settings, scopes=[None])
    config = Config.from_env({})
    runtime = Runtime(config, FakeApi(), FakeHttp(), Metrics(), ownership=ownership)  # type: ignore[arg-type]
    now = time.time()
    handed = {("ns", "cut"): Handed(now - 0.5, now + 1, 3, in_flight_since=now - 0.5)}
    ownership.take(0, time.monotonic() + 60, handed, vanished=None)
    ownership.listing(None)
    for name in ("cut", "new"):
        runtime.observe("ADDED", jobwatch(name, requestTimeout="2s", interval="1s"))
    # A cut request may run at the job service up to its request timeout.
    assert runtime.watches[("ns", "cut")].next_poll_time == pytest.approx(now + 1.5, 0.01)
    assert runtime.watches[("ns", "new")].next_poll_time == pytest.approx(now, abs=0.5)
    # A holder that vanished (kill -9, a freeze) may have left any request open.
    gone = LeaseSettings("ops", "r2", buckets=1)
    ownership = Ownership(gone, scopes=[None])
    runtime = Runtime(config, FakeApi(), FakeHttp(), Metrics(), ownership=ownership)  # type: ignore[arg-type]
    ownership.take(0, time.monotonic() + 60, {}, vanished=now - 1.0)
    ownership.listing(None)
    runtime.observe("ADDED", jobwatch("w", requestTimeout="2s", interval="1s"))
    assert runtime.watches[("ns", "w")].next_poll_time == pytest.approx(now + 1.0, 0.01)


async def test_a_bucket_given_up_before_its_watches_were_taken_in_hands_on_their_timing() -> None:
    # A rolling update moves a bucket twice within seconds: the replica that took it may
    # give it up again before it has read all its JobWatches. What the holder before it
    # handed over for them must reach the next holder (their status progress is minutes
    # old in a large fleet: polled at once from it, the job sees a second request early).
    # Likewise the time by which a vanished holder stopped, for watches not read yet.
    settings = LeaseSettings("ops", "r1", buckets=1)
    ownership = Ownership(settings, scopes=[None])
    config = Config.from_env({})
    runtime = Runtime(config, FakeApi(), FakeHttp(), Metrics(), ownership=ownership)  # type: ignore[arg-type]
    now = time.time()
    early = Handed(now - 5.0, now + 50.0, 2)
    ownership.take(0, time.monotonic() + 60, {("ns", "early"): early}, vanished=now - 3.0)
    ownership.listing(None)
    assert runtime.adoption is not None
    for name in ("early", "seen"):
        runtime.adoption.note("ADDED", ("ns", name), jobwatch(name))
    ownership.releasing(0)
    handed = await runtime.hand_over(frozenset({0}), budget=0.05)
    assert handed[("ns", "early")] == early
    seen = handed[("ns", "seen")]
    assert seen.last_end == seen.in_flight_since == now - 3.0
    # A watch taken in with a request the holder before may still have open passes its
    # start on too, until that request's time is up.
    ownership.take(0, time.monotonic() + 60, {("ns", "cut"): Handed(now - 1, now + 50, 1, now - 1)})
    ownership.listing(None)
    runtime.observe("ADDED", jobwatch("cut", requestTimeout="30s"))
    assert ("ns", "cut") in runtime.watches
    ownership.releasing(0)
    handed = await runtime.hand_over(frozenset({0}), budget=0.05)
    assert handed[("ns", "cut")].in_flight_since == pytest.approx(now - 1, abs=0.01)
