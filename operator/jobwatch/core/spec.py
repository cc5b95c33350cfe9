"""A JobWatch `spec` as a frozen `WatchSpec`: every API default applied, every field checked.

The operator applies the defaults itself and repeats the CRD's validation, so it never
depends on the API server having defaulted or validated an object (older CRD versions,
objects written before a schema change, tests that hand in plain dicts).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import yarl

from jobwatch.core.durations import format_duration, parse_duration

METHODS = ("GET", "POST", "PUT", "HEAD")
BODY_METHODS = frozenset({"POST", "PUT"})
DEFAULT_SUCCESS_WHEN = "response.code >= 200 && response.code < 300"
DEFAULT_FAILURE_WHEN = "false"
DEFAULT_PERMANENT_STATUS_CODES = frozenset({400, 401, 403, 404, 405, 410, 422})
MIN_TIMEOUT = 1.0
MAX_TIMEOUT = 168 * 3600.0
MIN_INTERVAL = 0.1
# Durations are whole nanoseconds in Go, so "> 0" is "at least 1ns".
_POSITIVE = 1e-9

# Size limits as in the CRD, which needs them to bound the cost of its CEL rules.
MAX_URL = 2048
MAX_HEADERS = 32
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_BODY = 65536
MAX_DURATION_TEXT = 64
MAX_EXPRESSION = 1024
MAX_RESULTS = 32
MAX_STATUS_CODES = 64
MAX_SECRET_NAME = 253
MAX_INT32 = 2**31 - 1

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")  # would split or end the header
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


class SpecError(Exception):
    """A spec field that cannot be used; str() is `spec.field: what is wrong`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Jitter(StrEnum):
    FULL = "Full"
    EQUAL = "Equal"
    NONE = "None"


@dataclass(frozen=True, slots=True)
class HeaderSpec:
    """A request header: a literal `value`, or the key of a Secret in the watch's namespace."""

    name: str
    value: str | None
    secret_name: str | None
    secret_key: str | None


@dataclass(frozen=True, slots=True)
class BackoffSpec:
    factor: float
    max_interval: float
    jitter: Jitter


@dataclass(frozen=True, slots=True)
class TLSSpec:
    insecure_skip_verify: bool
    ca_secret_name: str | None
    ca_secret_key: str | None


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """A validated spec; durations in seconds."""

    url: str
    method: str
    headers: tuple[HeaderSpec, ...]
    body: str | None
    timeout: float
    interval: float
    request_timeout: float
    backoff: BackoffSpec
    success_when: str
    failure_when: str
    result: tuple[tuple[str, str], ...]  # name → CEL expression, in spec order
    permanent_status_codes: frozenset[int]
    max_consecutive_errors: int
    suspend: bool
    tls: TLSSpec
    # Seconds after the end until the JobWatch is deleted; None: never. Like `suspend`,
    # not part of what the watch does: a change of it alone starts no new watch.
    ttl_seconds_after_finished: int | None = None


def parse_spec(raw: Mapping[str, Any]) -> WatchSpec:
    """The `WatchSpec` for a JobWatch's `spec`; raises `SpecError` naming the bad field."""
    raw = _object(raw, "spec")
    url = _url(raw.get("url"))
    method = _choice(raw.get("method"), "spec.method", METHODS, "GET")
    body = raw.get("body")
    if body is not None:
        body = _string(body, "spec.body", MAX_BODY)
        if method not in BODY_METHODS:
            raise SpecError("spec.body", f"a body is only sent with POST or PUT, not {method}")
    timeout = _duration(raw.get("timeout"), "spec.timeout", "10m", MIN_TIMEOUT, MAX_TIMEOUT)
    interval = _duration(raw.get("interval"), "spec.interval", "5s", MIN_INTERVAL)
    if timeout < interval:
        raise SpecError(
            "spec.timeout",
            f"{format_duration(timeout)} is shorter than spec.interval "
            f"({format_duration(interval)})",
        )
    return WatchSpec(
        url=url,
        method=method,
        headers=tuple(
            _header(item, f"spec.headers[{index}]")
            for index, item in enumerate(_list(raw.get("headers"), "spec.headers", MAX_HEADERS))
        ),
        body=body,
        timeout=timeout,
        interval=interval,
        request_timeout=_duration(
            raw.get("requestTimeout"), "spec.requestTimeout", "30s", _POSITIVE
        ),
        backoff=_backoff(_object(raw.get("backoff"), "spec.backoff")),
        success_when=_expression(raw.get("successWhen"), "spec.successWhen", DEFAULT_SUCCESS_WHEN),
        failure_when=_expression(raw.get("failureWhen"), "spec.failureWhen", DEFAULT_FAILURE_WHEN),
        result=_results(raw.get("result")),
        permanent_status_codes=_status_codes(raw.get("permanentStatusCodes")),
        max_consecutive_errors=_count(raw.get("maxConsecutiveErrors"), "spec.maxConsecutiveErrors"),
        suspend=_flag(raw.get("suspend"), "spec.suspend"),
        tls=_tls(_object(raw.get("tls"), "spec.tls")),
        ttl_seconds_after_finished=parse_ttl(raw.get("ttlSecondsAfterFinished")),
    )


def parse_ttl(value: Any) -> int | None:
    """`spec.ttlSecondsAfterFinished`: None when unset (never deleted); raises
    `SpecError` for anything but an integer from 0 to MAX_INT32, as the CRD does."""
    if value is None:
        return None
    return _count(value, "spec.ttlSecondsAfterFinished")


def spec_hash(raw: Mapping[str, Any]) -> str:
    """A short stable hash of what the watch does: the defaulted spec without `suspend`
    and `ttlSecondsAfterFinished`.

    Spelling out a default, reordering `result`, toggling `suspend` or changing the TTL
    keeps the hash; any other change makes a new one. Raises `SpecError` like
    `parse_spec`.
    """
    return spec_digest(parse_spec(raw))


def spec_digest(spec: WatchSpec) -> str:
    """`spec_hash` of an already parsed spec.

    Stored in `status.specHash`: the same spec must give the same digest in every
    version, or an upgraded operator would restart every watch (a test pins it).
    """
    material = _plain(spec)
    # Neither changes what is polled nor how: a change of them alone is the same watch
    # (and the hashes stored before the TTL existed stay valid).
    del material["suspend"], material["ttl_seconds_after_finished"]
    material["permanent_status_codes"] = sorted(spec.permanent_status_codes)
    material["result"] = sorted(material["result"])
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    # What dataclasses.asdict makes of a spec, without its deep copies: asdict was
    # most of the CPU of adopting 10k JobWatches at start-up.
    if isinstance(value, (HeaderSpec, BackoffSpec, TLSSpec, WatchSpec)):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(field, f"must be an object, not {_show(value)}")
    return value


def _list(value: Any, field: str, max_items: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(field, f"must be a list, not {_show(value)}")
    if len(value) > max_items:
        raise SpecError(field, f"must have at most {max_items} items, not {len(value)}")
    return value


def _string(value: Any, field: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, not {_show(value)}")
    if len(value) > max_length:
        raise SpecError(field, f"must be at most {max_length} characters, not {len(value)}")
    return value


def _required_string(value: Any, field: str, max_length: int) -> str:
    if value is None or value == "":
        raise SpecError(field, "is required")
    return _string(value, field, max_length)


def _matching(value: Any, field: str, pattern: re.Pattern[str], what: str) -> str:
    text = _required_string(value, field, MAX_SECRET_NAME)
    if not pattern.fullmatch(text):
        raise SpecError(field, f"{_show(text)} is not a valid {what}")
    return text


def _choice(value: Any, field: str, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise SpecError(field, f"{_show(value)} is not one of {', '.join(choices)}")
    return str(value)


def _flag(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(field, f"must be true or false, not {_show(value)}")
    return value


def _count(value: Any, field: str) -> int:
    if value is None:
        return 0
    if not _is_int(value) or not 0 <= value <= MAX_INT32:
        raise SpecError(field, f"must be an integer from 0 to {MAX_INT32}, not {_show(value)}")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _duration(
    value: Any, field: str, default: str, at_least: float, at_most: float = math.inf
) -> float:
    if value is None:
        value = default
    if not isinstance(value, str):
        raise SpecError(field, f'must be a duration string such as "5s", not {_show(value)}')
    _string(value, field, MAX_DURATION_TEXT)
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        raise SpecError(field, str(error)) from None
    if seconds < at_least:
        raise SpecError(
            field, f'"{value}" is too short: must be at least {format_duration(at_least)}'
        )
    if seconds > at_most:
        raise SpecError(field, f'"{value}" is too long: must be at most {format_duration(at_most)}')
    return seconds


def _expression(value: Any, field: str, default: str) -> str:
    return default if value is None else _required_string(value, field, MAX_EXPRESSION)


def _results(value: Any) -> tuple[tuple[str, str], ...]:
    raw = _object(value, "spec.result")
    if len(raw) > MAX_RESULTS:
        raise SpecError("spec.result", f"must have at most {MAX_RESULTS} entries, not {len(raw)}")
    return tuple(
        (name, _required_string(expression, f"spec.result.{name}", MAX_EXPRESSION))
        for name, expression in raw.items()
    )


def _url(value: Any) -> str:
    # The URL is never quoted back: it may carry credentials, and messages reach events.
    url = _required_string(value, "spec.url", MAX_URL)
    if _URL_FORBIDDEN.search(url):
        raise SpecError("spec.url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1/": the API server's isURL() lets some of these pass
        raise SpecError("spec.url", "is not a valid URL (check the host's brackets)") from None
    if parts.scheme not in ("http", "https"):
        raise SpecError("spec.url", "must be an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise SpecError("spec.url", "has an invalid port") from None
    if not parts.hostname:
        raise SpecError("spec.url", "has no host")
    # The client parses with yarl: a URL it refuses could never be polled, so it is
    # refused here, where the user sees it at once.
    try:
        yarl.URL(url)
    except (ValueError, TypeError):
        raise SpecError("spec.url", "is not a URL the operator can request") from None
    return url


def _header(value: Any, field: str) -> HeaderSpec:
    raw = _object(value, field)
    name = _required_string(raw.get("name"), f"{field}.name", MAX_HEADER_NAME)
    if not _TOKEN.fullmatch(name):
        raise SpecError(f"{field}.name", f"{_show(name)} is not a valid HTTP header name")
    literal = raw.get("value")
    value_from = raw.get("valueFrom")
    if (literal is None) == (value_from is None):
        raise SpecError(field, "set exactly one of value and valueFrom")
    if value_from is not None:
        secret_name, secret_key = _secret_ref(
            _object(value_from, f"{field}.valueFrom").get("secretKeyRef"),
            f"{field}.valueFrom.secretKeyRef",
        )
        return HeaderSpec(name, None, secret_name, secret_key)
    # The value itself is never quoted back: it may be a token.
    text = _string(literal, f"{field}.value", MAX_HEADER_VALUE)
    if _HEADER_VALUE_FORBIDDEN.search(text):
        raise SpecError(f"{field}.value", "must not contain CR, LF or NUL characters")
    return HeaderSpec(name, text, None, None)


def _secret_ref(value: Any, field: str) -> tuple[str, str]:
    if value is None:
        raise SpecError(field, "is required")
    raw = _object(value, field)
    return (
        _matching(raw.get("name"), f"{field}.name", _SECRET_NAME, "Secret name"),
        _matching(raw.get("key"), f"{field}.key", _SECRET_KEY, "Secret key"),
    )


def _backoff(raw: Mapping[str, Any]) -> BackoffSpec:
    return BackoffSpec(
        factor=_factor(raw.get("factor")),
        # A zero cap would retry a failing endpoint in a busy loop.
        max_interval=_duration(
            raw.get("maxInterval"), "spec.backoff.maxInterval", "1m", MIN_INTERVAL
        ),
        jitter=Jitter(
            _choice(raw.get("jitter"), "spec.backoff.jitter", tuple(Jitter), Jitter.FULL)
        ),
    )


def _factor(value: Any) -> float:
    if value is None:
        return 2.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value < math.inf:
        raise SpecError(
            "spec.backoff.factor", f"must be a number of at least 1, not {_show(value)}"
        )
    return float(value)


def _status_codes(value: Any) -> frozenset[int]:
    if value is None:
        return DEFAULT_PERMANENT_STATUS_CODES
    codes = _list(value, "spec.permanentStatusCodes", MAX_STATUS_CODES)
    for index, code in enumerate(codes):
        if not _is_int(code) or not 100 <= code <= 599:
            raise SpecError(
                f"spec.permanentStatusCodes[{index}]",
                f"must be an HTTP status code (100-599), not {_show(code)}",
            )
    return frozenset(codes)


def _tls(raw: Mapping[str, Any]) -> TLSSpec:
    ca_ref = raw.get("caSecretRef")
    ca_name, ca_key = (
        (None, None) if ca_ref is None else _secret_ref(ca_ref, "spec.tls.caSecretRef")
    )
    return TLSSpec(
        insecure_skip_verify=_flag(raw.get("insecureSkipVerify"), "spec.tls.insecureSkipVerify"),
        ca_secret_name=ca_name,
        ca_secret_key=ca_key,
    )


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON/YAML, cut short."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
