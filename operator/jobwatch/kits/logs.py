"""Log output: text for a terminal, or one JSON object per line (JOBWATCH_LOG_FORMAT=json).

In JSON every line, kopf's and the libraries' included, has `time` (RFC 3339, UTC),
`level`, `logger` and `message`; a line about one JobWatch adds its `kind`, `namespace`,
`name` and `uid`, and one with an exception its traceback as `exception`. Log calls
name the JobWatch with `extra=about(ref)`; kopf's object loggers name theirs in
`k8s_ref`, which is read too.

Only these fields are written. Whatever else a library attaches to a record (kopf
attaches its whole settings object) never reaches the output, so the message is the
only free text: the same text the text format prints, which never holds a Secret's
value, a token or a header value.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from jobwatch.core.refs import ObjectRef

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The LogRecord attribute that `about` sets.
_JOBWATCH = "jobwatch"
_REF_FIELDS = ("kind", "namespace", "name", "uid")


class LogFormat(enum.StrEnum):
    TEXT = "text"  # for a terminal
    JSON = "json"  # one object per line, for Loki, Elasticsearch and the like


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How the operator logs (config.log_settings_from_env reads them)."""

    format: LogFormat
    level: int


def about(ref: ObjectRef) -> dict[str, Any]:
    """`extra=` of a log call about one JobWatch."""
    return {_JOBWATCH: ref}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        entry.update(_object(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a message quoting an endpoint's bytes may hold lone surrogates,
        # which a UTF-8 stderr could not encode; the line would become a traceback.
        return json.dumps(entry, ensure_ascii=True)


def _rfc3339(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # Arguments that do not fit the format string: logging itself would print a
        # multi-line "--- Logging error ---" to stderr instead of this line.
        return f"{record.msg} (log arguments did not fit the message)"


def _object(record: logging.LogRecord) -> dict[str, str]:
    ref = getattr(record, _JOBWATCH, None)
    if isinstance(ref, ObjectRef):
        return {"kind": "JobWatch", "namespace": ref.namespace, "name": ref.name, "uid": ref.uid}
    kopf_ref = getattr(record, "k8s_ref", None)
    if isinstance(kopf_ref, Mapping):
        return {key: str(kopf_ref[key]) for key in _REF_FIELDS if kopf_ref.get(key)}
    return {}


def setup(settings: LogSettings) -> None:
    """Sends every logger's records to stderr in the chosen format."""
    json_lines = settings.format is LogFormat.JSON
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.level, handlers=[handler], force=True)
    # Python's warnings and an exception that ends the process would otherwise be
    # printed as bare text.
    logging.captureWarnings(True)
    if json_lines:
        sys.excepthook = _log_uncaught


_crash_log = logging.getLogger("jobwatch")


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    _crash_log.critical("the operator stopped: %s", kind.__name__, exc_info=(kind, exc, traceback))
