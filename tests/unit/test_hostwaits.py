"""The polls their host's limits hold back (hostwaits.py): a reserved slot is used once,
the line for a slot in flight is first come first served, and how long the limits held
a poll is counted once, for the poll they held."""

from __future__ import annotations

import random

from jobwatch.control.hostwaits import HostWaits
from jobwatch.jobservice.hosts import Hosts, HostSettings, origin

_KEYS = Hosts(HostSettings(), random.Random(1).random)
HOST = _KEYS.key("ns", "http://jobs.test/")
OTHER = _KEYS.key("ns", "http://other.test/")
A, B, C = ("ns", "a"), ("ns", "b"), ("ns", "c")


def waits() -> tuple[HostWaits, Hosts]:
    hosts = Hosts(HostSettings(), random.Random(1).random)
    return HostWaits(hosts), hosts


def test_a_reserved_slot_is_used_once() -> None:
    line, _ = waits()
    assert not line.take_reservation(A)
    line.reserve(A)
    assert line.take_reservation(A)
    assert not line.take_reservation(A)


def test_the_line_for_a_slot_is_first_come_first_served_per_host() -> None:
    line, _ = waits()
    for key in (A, B):
        line.hold(key, 0.0, 5.0, HOST, line=True)
    line.hold(C, 0.0, 5.0, OTHER, line=True)
    assert line.any_held and line.anyone_in_line
    assert [line.pop_line(HOST), line.pop_line(HOST)] == [A, B]
    assert not line.in_line(HOST) and line.in_line(OTHER)
    assert line.held(A) == (0.0, 5.0, HOST)  # still held: only out of the line


def test_a_hold_without_a_place_in_line_keeps_none() -> None:
    line, _ = waits()
    line.hold(A, 0.0, 5.0, HOST, line=False)
    assert line.any_held and not line.anyone_in_line


def test_the_same_poll_held_again_keeps_its_start() -> None:
    line, _ = waits()
    line.hold(A, 1.0, 5.0, HOST, line=True)
    assert line.held_since(A, 5.0, HOST, now=3.0, reserved=False) == 1.0
    assert line.in_line(HOST)
    # Given a slot now: out of the line, the start still counts.
    assert line.held_since(A, 5.0, HOST, now=3.0, reserved=True) == 1.0
    assert not line.any_held and not line.in_line(HOST)


def test_another_poll_held_starts_anew() -> None:
    line, _ = waits()
    line.hold(A, 1.0, 5.0, HOST, line=True)
    assert line.held_since(A, 9.0, HOST, now=3.0, reserved=False) == 3.0
    assert not line.any_held and not line.anyone_in_line


def test_the_delay_is_counted_once_for_the_poll_that_was_held() -> None:
    line, hosts = waits()
    line.hold(A, 1.0, 5.0, HOST, line=True)
    line.count_delay(A, 5.0, now=4.0)
    line.count_delay(A, 5.0, now=6.0)  # released already: nothing more
    line.hold(B, 1.0, 5.0, HOST, line=False)
    line.count_delay(B, 7.0, now=8.0)  # planned anew since: not the limits' delay
    assert hosts.delays() == {origin(HOST): (1, 3.0)}
    assert not line.any_held and not line.anyone_in_line


def test_a_forgotten_watch_leaves_nothing_held_or_reserved() -> None:
    line, _ = waits()
    line.reserve(A)
    line.hold(A, 0.0, 5.0, HOST, line=True)
    line.forget(A)
    assert not line.take_reservation(A)
    assert line.held(A) is None and not line.anyone_in_line
