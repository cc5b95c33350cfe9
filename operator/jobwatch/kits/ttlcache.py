"""The one TTL cache with single-flight loads: a small shared kit, as `ratelimit.py` is.

Used by the adapters whose answers are reused for a while, and whose lookups must not be
repeated by every caller that wants the same key at once: DNS answers (`resolver.py`,
in the jobservice adapter) and Secrets (`secrets.py`, in the kube adapter).
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Entry(Generic[V]):
    value: V
    stored: float  # the clock's time when it was stored
    expires: float  # ... and from when it is no longer fresh


class TtlCache(Generic[K, V]):
    """Entries with a time to live each, at most `max_entries` of them (the least recently
    used go first), and one load per key in flight: callers of a key share it, and a
    caller that gives up does not cancel it for the others. Use it inside one running
    event loop."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self._max_entries, self._clock = max_entries, clock
        self._entries: OrderedDict[K, Entry[V]] = OrderedDict()
        self._loads: dict[K, asyncio.Task[V]] = {}

    def fresh(self, key: K) -> Entry[V] | None:
        """The entry of `key` while it is fresh (it is then the most recently used)."""
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.expires:
            return None
        self._entries.move_to_end(key)
        return entry

    def get(self, key: K) -> Entry[V] | None:
        """The entry of `key`, fresh or not."""
        return self._entries.get(key)

    def put(self, key: K, value: V, ttl: float) -> None:
        now = self._clock()
        self._entries[key] = Entry(value, stored=now, expires=now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def load(self, key: K, fetch: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """What `fetch()` returns (or raises), from the load of `key` in flight if there is
        one, else from a new one. `fetch` stores what it should keep (`put`)."""
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = asyncio.create_task(fetch())
            load.add_done_callback(functools.partial(self._load_done, key))
        # A caller that gives up must not cancel the load the others wait for.
        return await asyncio.shield(load)

    async def close(self) -> None:
        """Cancels the loads in flight and waits for them to end."""
        for load in list(self._loads.values()):
            load.cancel()
        await asyncio.gather(*self._loads.values(), return_exceptions=True)

    def _load_done(self, key: K, load: asyncio.Task[V]) -> None:
        if self._loads.get(key) is load:
            del self._loads[key]
        # Every waiter may have given up: fetch the outcome so asyncio does not
        # report it as never retrieved.
        if not load.cancelled():
            load.exception()
