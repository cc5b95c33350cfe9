"""Log output (logs.py): JSON lines with fixed fields, and the log settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

import kopf
import pytest
from kopf._core.actions.loggers import ObjectLogger

from jobwatch.app.config import ConfigError, log_settings_from_env
from jobwatch.core.refs import ObjectRef
from jobwatch.kits.logs import JsonFormatter, LogFormat, LogSettings, about

REF = ObjectRef("team-a", "report-42", "6f1c2a1e-0000-4000-8000-000000000042")


class Lines(logging.Handler):
    """What a JsonFormatter makes of each record `log` takes, parsed back."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.raw: list[str] = []
        # Outside the logger tree: no handler of pytest's (or anyone's) sees its records.
        self.log = logging.Logger("jobwatch.test", logging.DEBUG)
        self.log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.raw.append(self.format(record))

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.raw]


@pytest.fixture
def lines() -> Lines:
    return Lines()


def test_a_line_has_time_level_logger_and_message(lines: Lines) -> None:
    lines.log.warning("polling %d watches", 3)
    [entry] = lines.entries
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["level"] == "warning"
    assert entry["logger"] == "jobwatch.test"
    assert entry["message"] == "polling 3 watches"
    assert entry["time"].endswith("Z")
    assert entry["time"][:4].isdigit() and "T" in entry["time"]


def test_a_line_about_a_jobwatch_names_it(lines: Lines) -> None:
    lines.log.info("ended", extra=about(REF))
    [entry] = lines.entries
    assert entry["kind"] == "JobWatch"
    assert (entry["namespace"], entry["name"], entry["uid"]) == (REF.namespace, REF.name, REF.uid)


def test_an_exception_is_a_field_with_the_traceback(lines: Lines) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        lines.log.exception("poll failed", extra=about(REF))
    [raw] = lines.raw
    assert "\n" not in raw, "one record, one line"
    [entry] = lines.entries
    assert entry["message"] == "poll failed"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in entry["exception"]
    assert entry["name"] == REF.name


def test_other_record_attributes_never_reach_the_output(lines: Lines) -> None:
    lines.log.info("x", extra={"token": "s3cr3t", "headers": {"a": "b"}})
    [raw] = lines.raw
    assert "s3cr3t" not in raw
    assert set(json.loads(raw)) == {"time", "level", "logger", "message"}


def test_any_message_is_one_ascii_line(lines: Lines) -> None:
    lines.log.info("body:\n%s", "caf\u00e9 \udcff\r\nend")
    # A bug in a call site (the very thing the linter flags): still a line.
    lines.log.info("%s/%s needs two", "only one")  # noqa: PLE1206
    first, second = lines.raw
    assert first.isascii() and "\n" not in first
    assert json.loads(first)["message"] == "body:\ncaf\u00e9 \udcff\r\nend"
    assert json.loads(second)["message"].startswith("%s/%s needs two")


def test_kopf_object_loggers_name_their_object(lines: Lines) -> None:
    # kopf's own per-object logger, as its handlers get it: the reference rides in
    # `k8s_ref`, next to kopf's whole settings object, which must stay out.
    body = kopf.Body(
        {
            "apiVersion": "jobwatch.dev/v1alpha1",
            "kind": "JobWatch",
            "metadata": {"namespace": REF.namespace, "name": REF.name, "uid": REF.uid},
        }
    )
    kopf_logger = ObjectLogger(body=body, settings=kopf.OperatorSettings())
    kopf_logger.logger = lines.log
    kopf_logger.warning("handler failed")
    [entry] = lines.entries
    assert entry == {
        "time": entry["time"],
        "level": "warning",
        "logger": "jobwatch.test",
        "message": "handler failed",
        "kind": "JobWatch",
        "namespace": REF.namespace,
        "name": REF.name,
        "uid": REF.uid,
    }


def test_log_settings_default_to_text_at_info() -> None:
    assert log_settings_from_env({}) == LogSettings(LogFormat.TEXT, logging.INFO)
    settings = log_settings_from_env(
        {"JOBWATCH_LOG_FORMAT": " JSON ", "JOBWATCH_LOG_LEVEL": "debug"}
    )
    assert settings == LogSettings(LogFormat.JSON, logging.DEBUG)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("JOBWATCH_LOG_FORMAT", "logfmt"), ("JOBWATCH_LOG_FORMAT", ""), ("JOBWATCH_LOG_LEVEL", "10")],
)
def test_bad_log_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        log_settings_from_env({variable: value})
    assert variable in str(caught.value)


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else ["-m", "jobwatch"])],
        env={**os.environ, "KUBECONFIG": "/nonexistent", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_everything_the_process_prints_is_json() -> None:
    # Records of any logger, a Python warning, and the exception that ends the process.
    ran = run(
        "import logging, warnings\n"
        "from jobwatch.kits import logs\n"
        "from jobwatch.app.config import log_settings_from_env\n"
        "logs.setup(log_settings_from_env())\n"
        "logging.getLogger('kopf.activities.startup').info('started')\n"
        "warnings.warn('deprecated')\n"
        "raise RuntimeError('boom')\n",
        JOBWATCH_LOG_FORMAT="json",
    )
    assert ran.returncode == 1
    assert ran.stdout == ""
    entries = [json.loads(line) for line in ran.stderr.splitlines()]
    assert [(e["logger"], e["level"]) for e in entries] == [
        ("kopf.activities.startup", "info"),
        ("py.warnings", "warning"),
        ("jobwatch", "critical"),
    ]
    assert "RuntimeError: boom" in entries[2]["exception"]


def test_a_bad_configuration_is_a_json_line_too() -> None:
    ran = run("", JOBWATCH_LOG_FORMAT="json", JOBWATCH_MAX_IN_FLIGHT="many")
    assert ran.returncode == 2
    [line] = ran.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "critical"
    assert entry["message"] == "bad configuration: JOBWATCH_MAX_IN_FLIGHT='many' is not a number"
