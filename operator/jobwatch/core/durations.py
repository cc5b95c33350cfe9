"""Go/Kubernetes duration strings (`500ms`, `1h30m`) to seconds and back."""

from __future__ import annotations

import re

# Go accepts both the micro sign (U+00B5) and the Greek mu (U+03BC) for microseconds.
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Longer units first, so that "ms" is not read as "m" followed by a stray "s".
_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_HINT = "use Go form, e.g. 500ms, 5s, 1m30s"


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as `5s`, `1.5h` or `1h30m`.

    Like Go's `time.ParseDuration`, a bare `0` is allowed and every other number needs a
    unit; unlike it, a sign is refused, because no duration in the API may be negative.
    """
    if text.startswith("-"):
        raise ValueError(f'"{text}" is not allowed: durations must not be negative')
    if text == "0":
        return 0.0
    total = 0.0
    position = 0
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    if position == 0 or position < len(text):
        raise ValueError(f'"{text}" is not a duration ({_HINT})')
    return total


def format_duration(seconds: float) -> str:
    """A short Go-like form for messages: `500ms`, `5s`, `1m30s`, `2h`, `1.5s`.

    The result parses back with `parse_duration` (sub-second parts to the microsecond).
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    if nanos < 1_000:
        return f"{nanos}ns"
    if nanos < 1_000_000:
        return f"{_decimal(nanos / 1e3)}\u00b5s"
    if nanos < 1_000_000_000:
        return f"{_decimal(nanos / 1e6)}ms"
    hours, nanos = divmod(nanos, 3_600_000_000_000)
    minutes, nanos = divmod(nanos, 60_000_000_000)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if nanos:
        parts.append(f"{_decimal(nanos / 1e9)}s")
    return "".join(parts)


def _decimal(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")
