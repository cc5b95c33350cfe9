"""Watches moving between replicas with their buckets: handed over when a bucket is given
up, dropped when it is lost, polled again when a parked bucket comes back, and taken over
with the timing the previous holder left.

Layer: control (sharding).
"""

from __future__ import annotations

import asyncio
import contextlib

from jobwatch.control.hostwaits import Key
from jobwatch.control.sharding.adoption import Adoption
from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.watchbook import WatchBook
from jobwatch.core.watch import Watch

# How long a handover waits for the polls it cut to unwind (a cut is immediate).
CUT_WAIT = 1.0


class BucketHandover:
    """What happens to this replica's watches when the elector gives up, loses or takes
    back a bucket (the `elector.Handover` calls other than `adopt`)."""

    def __init__(self, book: WatchBook, ownership: Ownership, adoption: Adoption) -> None:
        self._book, self._ownership, self._adoption = book, ownership, adoption

    def drop(self, buckets: frozenset[int]) -> None:
        """Lost buckets: forget their watches at once; nothing more is written for them
        (their new holder adopts them from what was)."""
        ownership = self._ownership
        self._adoption.stop(buckets)
        for key in [k for k in self._book.watches if ownership.bucket(*k) in buckets]:
            self._book.forget(key)

    def resume(self, buckets: frozenset[int]) -> None:
        """Parked buckets are this replica's again, nobody else's in between: their
        watches, as they were, poll again (those due meanwhile paced), finished ones are
        planned for deletion after their TTL, and what could not be written meanwhile is
        written."""
        book, ownership = self._book, self._ownership
        now = book.wall()
        for key, watch in book.watches.items():
            if ownership.bucket(*key) not in buckets:
                continue
            # What could not be written while parked (an end above all) goes out now.
            book.writer.submit(watch, urgent=True)
            if watch.finished and watch.deletion is not None:
                # Its deletion after the TTL (a time passed meanwhile runs at once).
                book.plan_deletion(key, watch.deletion.expiry.due)
            elif not watch.finished and watch.spec:
                due = (
                    watch.deadline
                    if watch.suspended
                    else book.paced(watch.next_poll_time or now, watch)
                )
                book.plan(key, watch, due)

    async def hand_over(self, buckets: frozenset[int], budget: float) -> dict[Key, Handed]:
        """Buckets given up: no new poll starts (the ownership says so already), the polls
        in flight end, and phase and reason changes are written, within `budget` seconds;
        requests still open then are cut (their sockets closed) and the watches are
        forgotten. Returns when each last polled and was to poll next, and since when a
        cut request was out, for the next holder (progress written only every progress
        interval would be older)."""
        book, ownership, scheduler = self._book, self._ownership, self._book.scheduler
        self._adoption.stop(buckets)
        keys = [k for k in book.watches if ownership.bucket(*k) in buckets]
        for key in keys:
            scheduler.cancel(key)
        deadline = book.clock() + budget
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                await scheduler.wait_idle(keys)
        cut = {key for key in keys if scheduler.running(key)}
        if cut:
            # Left open, such a request would overlap with the next holder's first one.
            ownership.cut(buckets)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CUT_WAIT):
                    await scheduler.wait_idle(cut)
        refs = [book.watches[key].ref for key in keys if key in book.watches]
        await book.writer.settle(refs, max(0.0, deadline - book.clock()))
        handed: dict[Key, Handed] = {}
        now = book.wall()
        for key in keys:
            watch = book.watches.get(key)
            if watch is not None and not watch.finished:
                since = watch.last_poll_time if key in cut else _busy_since(watch, now)
                handed[key] = Handed(watch.last_end, watch.next_poll_time, watch.attempts, since)
            book.forget(key)
        # Watches not taken in yet (a bucket given up again while being adopted, as in a
        # rolling update): the next holder needs their timing as much, or it polls them
        # from status progress minutes old, a few seconds after their last request.
        for key, timing in ownership.unadopted(buckets).items():
            handed.setdefault(key, timing)
        for key in self._adoption.known(buckets).difference(handed, keys):
            gone = ownership.vanished(*key)
            if gone is not None:
                handed[key] = Handed(gone, None, 0, gone)
        return handed


def still_ours(book: WatchBook, ownership: Ownership | None, key: Key) -> bool:
    """May this replica act on the watch now (poll it, delete it after its TTL)? Checked
    before anything is sent: a replica that could not renew its bucket's Lease in time
    (the API server away, the process stopped for a while) drops the watch before another
    may take it."""
    now = book.clock()
    if ownership is None or ownership.valid(key[0], key[1], now):
        return True
    if ownership.kept(key[0], key[1], now):
        return False  # parked: `resume` plans it again, `drop` forgets it
    if not ownership.writable(key[0], key[1], now):
        book.forget(key)
    return False  # being handed over: `hand_over` writes its status, then forgets it


def take_over(ownership: Ownership | None, key: Key, watch: Watch, *, resumed: bool) -> None:
    """A watch taken over from another replica: its timing as that replica left it
    (newer than the status progress), so that the rhythm and the timing floor hold
    across the handover; and no request before one the previous holder may still
    have open has ended, at the latest at its request timeout (one it cut at the
    handover, or any it sent before it vanished without one)."""
    if ownership is None:
        return
    handed = ownership.handed(*key)
    busy_since = ownership.vanished(*key)
    if busy_since is not None:
        # Its last request was sent by then at the latest: the timing floor counts
        # from there (status progress, written every few minutes in a large fleet,
        # is older), and no request before a slow one could have ended (below).
        watch.last_end = max(watch.last_end or 0.0, busy_since)
    if handed is not None:
        if resumed:
            if handed.last_end is not None:
                watch.last_end = max(watch.last_end or 0.0, handed.last_end)
                watch.last_poll_time = max(watch.last_poll_time or 0.0, handed.last_end)
            if handed.next_poll is not None:
                watch.next_poll_time = max(watch.next_poll_time or 0.0, handed.next_poll)
            watch.attempts = max(watch.attempts, handed.attempts)
        elif handed.last_end is not None:
            watch.last_end = max(watch.last_end or 0.0, handed.last_end)
        if handed.in_flight_since is not None:
            busy_since = max(busy_since or 0.0, handed.in_flight_since)
    if busy_since is not None and watch.spec is not None:
        watch.not_before = busy_since + watch.spec.request_timeout


def _busy_since(watch: Watch, now: float) -> float | None:
    """When a request another replica may still have open for `watch` was sent (taken
    over, not polled since): the next holder must wait for it as this one does."""
    if watch.not_before is None or watch.spec is None or watch.not_before <= now:
        return None
    return watch.not_before - watch.spec.request_timeout
