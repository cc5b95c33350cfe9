"""Go/Kubernetes duration strings."""

from __future__ import annotations

import pytest

from jobwatch.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("1ns", 1e-9),
        ("1500ns", 1.5e-6),
        ("3us", 3e-6),
        ("3\u00b5s", 3e-6),  # micro sign
        ("3\u03bcs", 3e-6),  # Greek mu
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1h0m5s", 3605.0),
        ("1.5h", 5400.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("2m500ms", 120.5),
        ("1s1s", 2.0),  # Go adds repeated units
        ("168h", 604800.0),
    ],
)
def test_parses_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "5 s",
        " 5s",
        "5s ",
        "s",
        ".s",
        "5d",
        "5S",
        "1h 30m",
        "+5s",
        "1e3s",
        "5sec",
        "ms",
        ".",
    ],
)
def test_rejects_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration \(use Go form, e\.g\. 500ms, 5s"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-5s", "-0", "-1h30m"])
def test_rejects_negative_durations(text: str) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(text)


def test_error_quotes_the_input() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("5 s")
    assert str(caught.value) == '"5 s" is not a duration (use Go form, e.g. 500ms, 5s, 1m30s)'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1e-9, "1ns"),
        (1e-10, "0s"),  # Go durations are whole nanoseconds
        (1.5e-7, "150ns"),
        (1.5e-6, "1.5\u00b5s"),
        (2e-6, "2\u00b5s"),
        (0.0005, "500\u00b5s"),
        (0.5, "500ms"),
        (0.1, "100ms"),
        (0.0125, "12.5ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (5, "5s"),
        (60, "1m"),
        (90, "1m30s"),
        (600, "10m"),
        (3600, "1h"),
        (3605, "1h5s"),
        (5400, "1h30m"),
        (604800, "168h"),
        (3.3000000000000003, "3.3s"),  # float noise is not shown
        (-5, "-5s"),
    ],
)
def test_formats_short_go_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds", [1e-9, 0.000001, 0.25, 1.001, 59.5, 61, 3599.999, 86400 + 1.5, 604800]
)
def test_format_parses_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
