"""JOBWATCH_LOG_FORMAT=json: everything the operator prints is a JSON line (kits/logs.py)."""

from __future__ import annotations

import datetime
import json
from typing import Any

from conftest import OperatorFactory
from harness import JobServer, Namespace, Reply

PENDING = Reply(200, {"status": "PROCESSING"})
RULES = {
    "successWhen": 'response.body.status == "COMPLETED"',
    "failureWhen": 'response.body.status == "FAILED"',
}
TOKEN = "tok-5d8e1f-never-logged"
LEVELS = {"debug", "info", "warning", "error", "critical"}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line the operator printed, parsed; the harness's start banner (an empty line,
    then `===== operator start ...`) aside."""
    lines = text.splitlines()
    banners = {i for i, line in enumerate(lines) if line.startswith("===== operator start ")}
    entries = []
    for i, line in enumerate(lines):
        if i in banners or (i + 1 in banners and not line):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def test_every_line_is_json_and_names_its_jobwatch(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    operator = start_operator(JOBWATCH_LOG_FORMAT="json")
    ns.secret("api-token", {"token": TOKEN}, labels={"jobwatch.dev/allow-use": "true"})
    done = Reply(200, {"status": "COMPLETED"})
    header = {
        "name": "Authorization",
        "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}},
    }
    watches = {
        "succeeds": jobs.script("/ok", [PENDING, done]),
        "fails": jobs.script("/bad", [Reply(200, {"status": "FAILED"})]),
        # A transient error (503) before it ends.
        "recovers": jobs.script("/flaky", [Reply(503, "busy"), done]),
        # Still polling when SIGTERM comes.
        "interrupted": jobs.script("/long", [PENDING]),
    }
    uids = {}
    for name, url in watches.items():
        spec = {"url": url, "interval": "200ms", "timeout": "5m", "headers": [header], **RULES}
        uids[name] = ns.create(name, spec)["metadata"]["uid"]
    ns.wait_phase("succeeds", "Succeeded")
    ns.wait_phase("fails", "Failed")
    recovered = ns.wait_phase("recovers", "Succeeded")
    assert recovered["attempts"] == 2
    ns.wait_status("interrupted", lambda s: s.get("attempts", 0) >= 2, 15, "2 attempts")
    assert jobs.seen("/long")[0].headers["authorization"] == TOKEN
    operator.stop()

    text = operator.logs()
    assert TOKEN not in text
    entries = json_lines(text)
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert entry["level"] in LEVELS, entry
        assert datetime.datetime.fromisoformat(entry["time"]).utcoffset() == datetime.timedelta()
        if "name" in entry:  # about one object: all of it, and one of this test's
            assert entry["kind"] == "JobWatch", entry
            assert entry["namespace"] == ns.name, entry
            assert entry["uid"] == uids[entry["name"]], entry
    loggers = {entry["logger"] for entry in entries}
    assert any(name.startswith("kopf.") for name in loggers), loggers
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("SIGTERM: stopping polls") for m in messages), messages
    assert "jobwatch stopped" in messages, messages[-3:]
    # Each end is a line about its watch.
    ends = {
        entry["name"]: entry["message"]
        for entry in entries
        if entry.get("name") and entry["logger"] == "jobwatch.control.runtime"
    }
    assert set(ends) == {"succeeds", "fails", "recovers"}, ends
    assert " Failed: " in ends["fails"]
