"""Taking in the JobWatches of a bucket taken from another replica, without listing the
whole scope again.

Every replica sees every event of its scope (one watch stream per scope) and notes the
key of each object, by bucket, owned or not: about 150 bytes an object. A bucket taken
is then adopted by reading each of its objects (a GET, served after the taking, so newer
than anything the previous holder wrote), READS at a time. Events of those objects that
arrive meanwhile are held and taken in after their read (the runtime keeps whichever
generation is newer); an object first seen meanwhile is read too. Once every object has
been read, the bucket's events are taken in as they come (`Ownership.adopted`).

Listing the scope again is left for when it is cheaper or the only way: before the
first listing is in (the keys are not all known yet), or when the buckets taken hold
more than READS_SHARE of the objects seen (one list of everything costs the API server
less than reads of that many objects one by one: a replica that takes over half the
fleet after a kill -9). A rebalance moves one bucket at a time, so a rolling update of
R replicas costs reads of about (buckets moved) x (objects per bucket), not R lists of
the whole scope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from jobwatch.control.sharding.ownership import Ownership

log = logging.getLogger(__name__)

Key = tuple[str, str]
Event = tuple[str | None, Mapping[str, Any]]
READS = 8  # GETs in flight at once, per replica
READS_SHARE = 0.1
MIN_READS = 1000  # below this many objects, reads always (a list has its own floor cost)
RETRY, MAX_RETRY = 1.0, 30.0  # between rounds of reads that failed


class _Taking:
    """One bucket being adopted: the keys still to read, being read, and read."""

    def __init__(self, keys: Iterable[Key]) -> None:
        self.pending: set[Key] = set(keys)
        self.reading: set[Key] = set()
        self.read: set[Key] = set()


class Adoption:
    def __init__(
        self,
        ownership: Ownership,
        read: Callable[[str, str], Awaitable[Mapping[str, Any] | None]],
        take_in: Callable[[str | None, Mapping[str, Any]], None],
    ) -> None:
        self._ownership, self._read, self._take_in = ownership, read, take_in
        self._known: dict[int, set[Key]] = {}
        self._taking: dict[int, _Taking] = {}
        self._late: dict[Key, Event] = {}  # the newest event of each key being read
        self._slots = asyncio.Semaphore(READS)
        self._tasks: set[asyncio.Task[None]] = set()
        self.reads = 0  # GETs sent, for tests and the log

    def note(self, event_type: str | None, key: Key, body: Mapping[str, Any]) -> bool:
        """Notes the event's object; True when the runtime is to take the event in."""
        ownership = self._ownership
        bucket = ownership.bucket(*key)
        if event_type == "DELETED":
            known = self._known.get(bucket)
            if known is not None:
                known.discard(key)
        else:
            self._known.setdefault(bucket, set()).add(key)
        if ownership.owns(*key):
            return True
        taking = self._taking.get(bucket)
        if taking is None:
            return False  # another replica's
        if key in taking.read:
            return True  # read already: from here on its events are newer than the read
        if key not in taking.reading:
            taking.pending.add(key)  # first seen now: read it too
        self._late[key] = (event_type, body)
        return False

    def known(self, buckets: frozenset[int]) -> set[Key]:
        """The keys seen of `buckets`' objects."""
        return set().union(*(self._known.get(bucket, ()) for bucket in buckets))

    def keep_only(self, namespace: str | None, keys: set[Key]) -> None:
        """After a fresh list of `namespace` (None: all): only what it showed is known."""
        for known in self._known.values():
            gone = [k for k in known if (namespace is None or k[0] == namespace) and k not in keys]
            known.difference_update(gone)

    def adopt(self, buckets: frozenset[int], *, listed: bool) -> bool:
        """Starts reading the objects of `buckets` (just taken); False when listing the
        scope again is the way (see the module's doc). `listed`: the first listing of
        every scope is in."""
        wanted = {bucket: set(self._known.get(bucket, ())) for bucket in buckets}
        count = sum(len(keys) for keys in wanted.values())
        # Buckets are taken one by one: those still being read count towards the share.
        reading = sum(len(t.pending) + len(t.reading) for t in self._taking.values())
        known = sum(len(keys) for keys in self._known.values())
        if not listed or count + reading > max(MIN_READS, READS_SHARE * known):
            return False
        for bucket, keys in wanted.items():
            taking = self._taking[bucket] = _Taking(keys)
            task = asyncio.get_running_loop().create_task(
                self._adopt(bucket, taking), name=f"jobwatch-adopt-{bucket}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.debug("adopting buckets %s by reading their %d JobWatches", sorted(buckets), count)
        return True

    def stop(self, buckets: Iterable[int]) -> None:
        """Buckets lost or given up: no more reads for them."""
        for bucket in buckets:
            taking = self._taking.pop(bucket, None)
            if taking is not None:
                for key in taking.pending | taking.reading:
                    self._late.pop(key, None)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _adopt(self, bucket: int, taking: _Taking) -> None:
        delay = RETRY
        while taking.pending and self._taking.get(bucket) is taking:
            keys = list(taking.pending)
            taking.pending.clear()
            results = await asyncio.gather(*(self._adopt_one(bucket, taking, k) for k in keys))
            failed = [key for key, ok in zip(keys, results, strict=True) if not ok]
            if failed and self._taking.get(bucket) is taking:
                taking.pending.update(failed)
                log.warning(
                    "bucket %d: %d JobWatches could not be read; again in %.0f s",
                    bucket,
                    len(failed),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY, 2 * delay)
        if self._taking.get(bucket) is taking:
            del self._taking[bucket]
            self._ownership.adopted(bucket)

    async def _adopt_one(self, bucket: int, taking: _Taking, key: Key) -> bool:
        """Reads one object and takes it in; False when the read failed."""
        async with self._slots:
            if self._taking.get(bucket) is not taking:
                return True  # given up meanwhile
            taking.reading.add(key)
            try:
                self.reads += 1
                body = await self._read(*key)
            except Exception as exc:
                log.debug("reading %s/%s failed (%s)", key[0], key[1], exc)
                return False
            finally:
                taking.reading.discard(key)
        if self._taking.get(bucket) is not taking:
            return True
        taking.read.add(key)
        if body is not None:
            self._take_in("ADDED", body)
        late = self._late.pop(key, None)
        if late is not None:
            self._take_in(*late)  # the runtime keeps the newer generation
        return True
