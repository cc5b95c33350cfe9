"""Taking objects in (intake.py): an object the spec parser crashes on, or that cannot be
taken in at all, gets a status saying so; `observe` never raises, whatever the object.
"""

from __future__ import annotations

from typing import Any

import pytest
from runtime_fakes import (
    Env,
    assert_invariant,
    jobwatch,
    raising,
    running_env,  # noqa: F401  (the `env` fixture)
    until,
    until_ended,
)

from jobwatch.control import intake as intake_module
from jobwatch.core.spec import spec_hash
from jobwatch.core.watch import Watch


async def test_an_object_the_parser_crashes_on_fails_as_invalid_spec(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, _api, _ = env
    real = intake_module.parse_spec

    def parse(raw: Any) -> Any:
        if raw.get("url", "").endswith("/bad"):
            raise IndexError("parser bug")
        return real(raw)

    monkeypatch.setattr(intake_module, "parse_spec", parse)
    runtime.observe("ADDED", jobwatch("bad"))
    runtime.observe("ADDED", jobwatch("good", timeout="1m"))
    final = await until_ended(env, "bad")
    assert (final["phase"], final["reason"]) == ("Failed", "InvalidSpec")
    assert "spec could not be parsed (IndexError)" in final["message"]
    await until(lambda: env[2].sent.get("http://jobs.test/good", 0) > 0, env)


async def test_an_object_that_cannot_be_taken_in_gets_a_status_saying_so(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, _api, http = env
    monkeypatch.setattr(Watch, "resume_from", raising(RuntimeError("resume")))
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
