"""Isolation between tenants' watches: a fault at a step of one watch's poll is that
watch's error, visible in its status until it ends, while a healthy neighbour in the
same namespace keeps polling as if nothing happened.

What users see of the same faults end to end is in tests/e2e/test_hostile_tenants.py;
the other faults of each step of a poll are in test_poller.py, of taking objects in in
test_intake.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from runtime_fakes import (
    SECRET_HEADER,
    Env,
    jobwatch,
    running_env,  # noqa: F401  (the `env` fixture)
    until,
)

from jobwatch.kube.api import Secret
from jobwatch.kube.errors import ApiError


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
