"""The poll pipeline (poller.py, with watchbook.py recording its decisions): whatever
step of a poll raises, the watch keeps a planned next poll or ends, with the error in its
status; how a poll ends; the timing floor across edits; a request cut when the hold on
its bucket ends.

The runtime here is the real one (scheduler, status writer, policy, CEL); the API server
and the job service are the stand-ins of runtime_fakes.py, so each step can be made to
fail on purpose.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from runtime_fakes import (
    SECRET_HEADER,
    Env,
    FakeHttp,
    Slow,
    jobwatch,
    polling,
    raising,
    replica,
    running_env,  # noqa: F401  (the `env` fixture)
    until,
    until_ended,
)

from jobwatch.control import watchbook as watchbook_module
from jobwatch.core import policy
from jobwatch.core import render as status_render
from jobwatch.core.expressions import CompiledWatch
from jobwatch.core.outcome import FailureKind, Outcome, RequestFailure, Response
from jobwatch.core.watch import Watch
from jobwatch.jobservice.client import Request


class Hung(FakeHttp):
    """A job service whose `/doomed-` paths answer nothing until the request's time runs
    out, and whose other paths answer as usual."""

    async def send(self, request: Request) -> Outcome:
        if "/doomed-" not in request.url:
            return await super().send(request)
        self.sent[request.url] = self.sent.get(request.url, 0) + 1
        await asyncio.sleep(request.timeout)
        message = f"request timed out after {request.timeout}s"
        return RequestFailure(FailureKind.TRANSPORT, message, host_failed=True, timed_out=True)


async def test_requests_the_deadline_cuts_short_end_their_watches_and_spare_the_host() -> None:
    http = Hung()
    async with polling(http) as env:
        runtime = env[0]
        doomed = [f"doomed-{i}" for i in range(12)]  # over the breaker's 10 failures
        for name in doomed:
            runtime.observe("ADDED", jobwatch(name, url=f"http://slow.test/{name}"))
        for name in doomed:
            status = await until_ended(env, name)
            assert (status["phase"], status["attempts"]) == ("TimedOut", 1), status
            assert status.get("lastError") is None and status["consecutiveErrors"] == 0, status
            assert re.fullmatch(
                r"deadline passed after 1 attempt, cutting it short after \d+ms", status["message"]
            ), status["message"]
        # Twelve requests ran out of time together, none for the host's sake: a neighbour
        # on the same host is polled at once, not held for the breaker's 5 s cooldown.
        runtime.observe("ADDED", jobwatch("steady", url="http://slow.test/steady"))
        await until(lambda: http.sent.get("http://slow.test/steady", 0) >= 3, env, timeout=2)


# --- each step of a poll ------------------------------------------------------------


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
    env: Env, monkeypatch: pytest.MonkeyPatch, target: tuple[Any, str, Any]
) -> None:
    monkeypatch.setattr(*target)
    env[0].observe("ADDED", jobwatch("w"))
    final = await until_ended(env, "w")
    assert final["phase"] == "TimedOut"
    assert "Internal" in env[1].error_classes("w")


async def test_a_secret_read_that_crashes_is_a_transient_error(env: Env) -> None:
    runtime, api, _ = env
    api.secret = raising(RuntimeError("inside the client"))
    runtime.observe("ADDED", jobwatch("w", **SECRET_HEADER))
    assert (await until_ended(env, "w"))["phase"] == "TimedOut"
    assert "Transient" in api.error_classes("w")


# --- ending -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "said"),
    [
        (
            (watchbook_module, "final_result", raising(RuntimeError("result"))),
            "result not evaluated (RuntimeError)",
        ),
        (
            (status_render, "render", raising(ValueError("render"))),
            "status could not be rendered (ValueError)",
        ),
    ],
    ids=["a_result_that_crashes_leaves_the_end_standing", "a_status_that_cannot_be_rendered"],
)
async def test_an_end_is_written_whatever_crashes_on_the_way(
    env: Env, monkeypatch: pytest.MonkeyPatch, target: tuple[Any, str, Any], said: str
) -> None:
    runtime, _api, http = env
    monkeypatch.setattr(*target)
    http.body = '{"status": "DONE"}'
    runtime.observe("ADDED", jobwatch("w"))
    final = await until_ended(env, "w")
    assert final["phase"] == "Succeeded"
    assert said in final["message"]


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
    json.dumps(final, allow_nan=False)  # what the API server receives


# --- timing -------------------------------------------------------------------------


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

    runtime._poller._http = SlowHttp()
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

    runtime._poller._http = SlowHttp()
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
