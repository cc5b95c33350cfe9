"""The handover codec: a watch's timing on a released Lease, rounded never sooner."""

from __future__ import annotations

from jobwatch.control.sharding.handed import (
    HANDOVER_ANNOTATION,
    Handed,
    decode_handover,
    encode_handover,
)


def carried(handed: dict[tuple[str, str], Handed], now: float) -> dict[tuple[str, str], Handed]:
    text = encode_handover(handed, now)
    assert text is not None
    return decode_handover({"metadata": {"annotations": {HANDOVER_ANNOTATION: text}}})


def test_a_handover_carries_each_watchs_timing_to_the_tenth_of_a_second() -> None:
    handed = {
        ("team", "w"): Handed(100.0, 130.0, 3, in_flight_since=95.0),
        ("team", "v"): Handed(None, None, 0),
    }
    assert carried(handed, now=100.0) == handed


def test_times_are_rounded_up_never_down() -> None:
    ((key, timing),) = carried({("team", "w"): Handed(100.01, 130.01, 1)}, now=100.0).items()
    assert key == ("team", "w")
    assert (timing.last_end, timing.next_poll) == (100.1, 130.1)


def test_nothing_to_hand_over_is_no_annotation() -> None:
    assert encode_handover({}, now=100.0) is None
