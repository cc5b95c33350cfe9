"""The polls their job service host's limits hold back: reserved slots, since when each
was held, and the line of polls waiting for a slot in flight.

Layer: control (bookkeeping of the poll pipeline; no I/O and no clock of its own: every
call that needs the time is given `now`, the wall clock watches are planned on).
"""

from __future__ import annotations

from jobwatch.jobservice.hosts import HostKey, Hosts

Key = tuple[str, str]


class HostWaits:
    def __init__(self, hosts: Hosts) -> None:
        self._hosts = hosts
        # Watches waiting on a rate-limit slot their host reserved for them.
        self._reserved: set[Key] = set()
        # Watches whose poll their host's limits hold back: since when and the poll that
        # hold planned (wall clock), and the host. How late the limits made it is counted
        # when it goes out.
        self._held_back: dict[Key, tuple[float, float, HostKey]] = {}
        # Of those, the ones waiting for a slot in flight, per host, first come first: one
        # goes as soon as a request to the host ends, as a due poll takes a free worker
        # (the hold's own time, up to a second away, is only the fallback).
        self._waiting: dict[HostKey, dict[Key, None]] = {}

    @property
    def any_held(self) -> bool:
        return bool(self._held_back)

    @property
    def anyone_in_line(self) -> bool:
        return bool(self._waiting)

    def reserve(self, key: Key) -> None:
        self._reserved.add(key)

    def take_reservation(self, key: Key) -> bool:
        """Whether the host reserved a slot for `key`'s poll; the reservation is used up."""
        if self._reserved and key in self._reserved:
            self._reserved.discard(key)
            return True
        return False

    def held(self, key: Key) -> tuple[float, float, HostKey] | None:
        return self._held_back.get(key)

    def held_since(
        self, key: Key, next_poll: float | None, host: HostKey, now: float, reserved: bool
    ) -> float:
        """The rate limit holds `key`'s poll: since when it holds this very poll (`now`
        unless it held it already, as planned, at the same host). An earlier hold of
        another poll, or one that now has a slot reserved, is let go."""
        before = self._held_back.get(key)
        same = before is not None and before[1:] == (next_poll, host)
        start = before[0] if before is not None and same else now
        if before is not None and (not same or reserved):
            self.release(key)
        return start

    def hold(self, key: Key, start: float, next_poll: float, host: HostKey, *, line: bool) -> None:
        """Notes the hold of `key`'s poll, planned for `next_poll`; `line`: it also waits
        in its host's line for a slot in flight (last)."""
        self._held_back[key] = (start, next_poll, host)
        if line:
            self._waiting.setdefault(host, {})[key] = None

    def in_line(self, host: HostKey) -> bool:
        return bool(self._waiting.get(host))

    def pop_line(self, host: HostKey) -> Key:
        """The first poll in `host`'s line (there is one: see `in_line`), out of it."""
        waiting = self._waiting[host]
        key = next(iter(waiting))
        del waiting[key]
        if not waiting:
            del self._waiting[host]
        return key

    def count_delay(self, key: Key, next_poll: float | None, now: float) -> None:
        """The poll of `key` goes out, or waits for another reason: count how long its
        host's limits held it, if this is the poll they held (not one planned since by an
        edit, a resume or a suspension)."""
        entry = self.release(key)
        if entry is not None and entry[1] == next_poll:
            self._hosts.delayed(entry[2], now - entry[0])

    def release(self, key: Key) -> tuple[float, float, HostKey] | None:
        entry = self._held_back.pop(key, None)
        if entry is not None:
            waiting = self._waiting.get(entry[2])
            if waiting is not None:
                waiting.pop(key, None)
                if not waiting:
                    del self._waiting[entry[2]]
        return entry

    def forget(self, key: Key) -> None:
        """The watch is gone: nothing of it stays held or reserved."""
        self._reserved.discard(key)
        self.release(key)
