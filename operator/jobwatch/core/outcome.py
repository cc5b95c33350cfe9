"""What one attempt produced: a response, or a failure to get a usable one.

The HTTP client makes these; the policy reads them. Nothing here may hold a
header value from the request: messages end up in status, events and logs.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import compress
from typing import Any

_UNPARSED: Any = object()

MAX_JSON_DEPTH = 64
# Bounds on what one body may make the parser build (see `_too_many_values`).
MAX_JSON_CONTAINERS = 10_000
MAX_JSON_VALUES = 100_000


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP response (after redirects), body within the size cap."""

    code: int
    headers: Mapping[str, str]  # names lower-case
    text: str  # the body decoded as UTF-8 (undecodable bytes replaced)
    latency_ms: int
    redirects: int = 0  # followed before this answer: it came from another hop
    _json: Any = field(default=_UNPARSED, repr=False, compare=False)
    _problem: str | None = field(default=None, repr=False, compare=False)

    @property
    def body(self) -> Any:
        """The body parsed as JSON, or None when it is not usable JSON (`body_problem`
        says why). Parsed once; never raises, whatever the endpoint sent."""
        if self._json is _UNPARSED:
            value, problem = _parse_json(self.text) if self.text else (None, None)
            object.__setattr__(self, "_json", value)
            if problem is not None:
                object.__setattr__(self, "_problem", problem)
        return self._json

    @property
    def body_problem(self) -> str | None:
        """Why `body` is None although the text is not empty, in a few words for a
        status message: "not JSON: Expecting value at line 1, column 1", "JSON nested
        deeper than 64 levels", "JSON number out of range: 1e400", ... None when the
        body is JSON (`null` included) or empty."""
        if self._json is _UNPARSED:
            self.body  # noqa: B018 (parses)
        return self._problem


class FailureKind(StrEnum):
    TRANSPORT = "Transport"  # connect, DNS, TLS, timeout: no response at all
    INVALID_RESPONSE = "InvalidResponse"  # body over the cap, too many redirects, ...
    EGRESS_DENIED = "EgressDenied"  # the destination is in a denied address range


@dataclass(frozen=True, slots=True)
class RequestFailure:
    kind: FailureKind
    message: str  # safe to publish: no header values, no URL credentials
    latency_ms: int = 0
    # The URL's own host did not answer (refused, unreachable, DNS, TLS handshake, a
    # broken connection, a timeout before any redirect). False when the fault is the
    # request's own (a CA bundle or header that cannot be used, a certificate the
    # watch's CA bundle does not trust) or a redirect target's: a host's circuit
    # breaker counts only the former.
    host_failed: bool = False
    # The request's time ran out (`requestTimeout`, or the deadline when that came first).
    timed_out: bool = False


Outcome = Response | RequestFailure


# --- JSON that CEL, json.dumps(allow_nan=False) and the Kubernetes API all take -----
#
# Python's json module accepts NaN and Infinity, turns 1e400 into inf, keeps integers
# of any size, decodes `"\ud800"` into a string that UTF-8 cannot encode, and raises
# RecursionError on deep nesting. Each of those would break something later (CEL's
# int64, the status write, CEL conversion, which recurses per level), so such a body
# is refused here, once, or for big integers and lone surrogates repaired.
#
# Costs: the C decoder does the work. A check hooked into it costs a Python call per
# number, so only floats always get one; integers get one when the text is short (a
# few numbers) or has a run of 19 digits somewhere, which every integer outside int64
# has. Only a text with more brackets than the depth limit can nest too deeply, and
# only such a text is walked. Per parse, before these checks and with them (2-core
# machine, Python 3.11): a 200-byte job status 3.4 and 3.8 µs; 100 KB of nested
# records 1.1 and 1.7 ms; 73 KB of integers 0.70 and 0.85 ms.

_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
_SPACE = " \t\n\r"  # JSON's whitespace; str.isspace() takes more
_LEADING_SPACE = tuple(_SPACE)
_INT64 = range(-(2**63), 2**63)
_CONTAINERS = frozenset({dict, list})
_SHORT_TEXT = 1024  # below this, checking each integer is cheaper than a scan
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19  # every integer outside int64 has them
# A JSON string, "unrolled" and possessive: a run of plain characters per step, and no
# backtracking into it when a string never ends.
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Unusable(Exception):
    """Valid JSON syntax for a value that cannot be carried on."""


def _parse_json(text: str) -> tuple[Any, str | None]:
    """`text` (not empty) as JSON data, or (None, why not); never raises."""
    if len(text) > _SHORT_TEXT and (too_many := _too_many_values(text)):
        return None, too_many
    try:
        decoder = _CHECKED
        if len(text) > _SHORT_TEXT and not _has_long_digits(text):
            decoder = _FLOATS_CHECKED
        start = 0
        if text.startswith(_LEADING_SPACE):
            start = len(text) - len(text.lstrip(_SPACE))
        value, end = decoder.raw_decode(text, start)  # json.loads costs a third more
        if end != len(text) and (rest := text[end:].lstrip(_SPACE)):
            raise json.JSONDecodeError("Extra data", text, len(text) - len(rest))
        if (
            len(text) > 2 * MAX_JSON_DEPTH
            and text.count("[") + text.count("{") > MAX_JSON_DEPTH
            and _deeper_than(value, MAX_JSON_DEPTH)
        ):
            return None, _DEEP
        if "\\" in text and ("\\ud" in text or "\\uD" in text):  # escapes of surrogates
            value = _without_lone_surrogates(value)
    except json.JSONDecodeError as error:
        return None, f"not JSON: {error.msg} at line {error.lineno}, column {error.colno}"
    except _Unusable as error:
        return None, str(error)
    except RecursionError:  # the decoder's own guard: far deeper than the limit
        return None, _DEEP
    return value, None


def _too_many_values(text: str) -> str | None:
    """Why `text` is refused unparsed: parsing runs on the event loop, and its cost is
    in the objects it makes, about 0.3 µs per array or object and 0.05 µs per other
    value. Counted in C (`str.count`): 1 MiB of 64-deep arrays took 140 ms to parse;
    these caps keep any body within about 10 ms (measured: 10.6 ms for 9,999 arrays
    holding 90,000 numbers). Brackets and commas inside strings (a log, a CSV) count
    only in a first rough pass: over a cap, the count is made again without them (a
    regex pass, 10 ms for 1 MiB of CSV in a string, 32 ms at worst for 150k strings)."""
    reason = _over_caps(text)
    if reason is not None and '"' in text:
        reason = _over_caps(_STRING.sub('""', text))  # a regex without backtracking
    return reason


def _over_caps(text: str) -> str | None:
    containers = text.count("[") + text.count("{")
    if containers > MAX_JSON_CONTAINERS:
        return f"JSON with more than {MAX_JSON_CONTAINERS} arrays and objects"
    if text.count(",") + containers > MAX_JSON_VALUES:
        return f"JSON with more than {MAX_JSON_VALUES} values"
    return None


def _has_long_digits(text: str) -> bool:
    """Whether `text` has a run of 19 digits, as an integer outside int64 (or just a
    string) does: a scan in C, cheaper than a call per integer in a long text."""
    # Encoded, as bytes.translate is a plain table lookup (str.translate is that
    # only for ASCII text).
    return _LONG_DIGITS in text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZERO)


def _integer(literal: str) -> int | float:
    """An int64 as int; a larger integer as a float, as the Kubernetes API server's
    own JSON decoding keeps it (CEL's int and the API's integers are int64)."""
    if len(literal) < 19:  # |n| < 10**18: the common case, no more checks
        return int(literal)
    if len(literal) <= 20:  # not int() on thousands of digits: slow, refused past 4300
        number = int(literal)
        if number in _INT64:
            return number
    return _float(literal)


def _float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):  # 1e400: JSON syntax, but no float (nor int64) holds it
        shown = literal if len(literal) <= 24 else literal[:20] + "…"
        raise _Unusable(f"JSON number out of range: {shown}")
    return number


def _constant(literal: str) -> Any:
    raise _Unusable(f"{literal} is not valid JSON")  # NaN, Infinity, -Infinity


_CHECKED = json.JSONDecoder(parse_int=_integer, parse_float=_float, parse_constant=_constant)
_FLOATS_CHECKED = json.JSONDecoder(parse_float=_float, parse_constant=_constant)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` levels: a walk, level by level, that
    never recurses and leaves the per-item work to C.

    `gc.get_referents` of lists and dicts gives their items and values (and maybe keys,
    which are strings): a container's traversal must visit everything that can be in a
    reference cycle, and lists and dicts can.
    """
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):  # after round n, `level` holds the containers at depth n + 1
        if not level:
            return False
        found = gc.get_referents(*level)
        level = list(compress(found, map(_CONTAINERS.__contains__, map(type, found))))
    return bool(level)


def _without_lone_surrogates(value: Any) -> Any:
    """`value` with each unpaired surrogate (`"\\ud800"`: UTF-8, and so the status,
    cannot carry it) replaced by U+FFFD, as Go's JSON decoding does."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return _CHECKED.decode(_SURROGATE.sub("\ufffd", text))
    return value
