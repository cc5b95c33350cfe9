"""Deleting finished JobWatches after `spec.ttlSecondsAfterFinished`, as Kubernetes'
TTL-after-finished controller deletes Jobs.

Layer: control. When a watch is due is core/expiry.py's (pure); this is the I/O:

- **Decided on the object as stored.** Each version of a finished watch the informer
  delivers (our own end write's echo included: the end is stored before anything is
  deleted) is decided on again (`seen`): the time is `status.completionTime` + TTL, so
  a restart or a replica that takes the watch over computes the same time. A change of
  the TTL alone re-plans (or cancels) from the same completionTime; an edit that starts
  a new watch replaces the finished one, and with it its deletion.
- **One scheduler.** The deletion is the key's one scheduler entry (a finished watch
  has no poll), run by the same workers as polls (`Runtime.poll` hands a finished
  watch's turn here). Only the replica that owns the watch runs it.
- **Preconditions.** The DELETE names the uid and resourceVersion decided on: neither a
  namesake created since nor an edit made since is deleted. A 409 reads the object and
  takes it in like an event (re-planned, cancelled, or a namesake taken in as new);
  a 404 is a deletion done by someone else.
- **Bounded.** Deletions share a token bucket of their own (`JOBWATCH_DELETE_QPS`,
  `_BURST`), booked in order, so 10,000 watches expiring at once (after a restart, say)
  are deleted at that rate: no flood of the API server, and status writes keep their
  own budget. A failure (403 from a ClusterRole without `delete`, 5xx, no answer) is
  tried again, 1 s doubling up to 5 min, with a Warning Event (`DeleteFailed`) and a log
  line when a streak starts or its error changes; the watch's status is not rewritten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from jobwatch.control.handover import still_ours
from jobwatch.control.hostwaits import Key
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.watchbook import WatchBook
from jobwatch.core.expiry import Deletion, Expiry, expiry_of, generation_of, seconds_left
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch, format_time
from jobwatch.kits.logs import about
from jobwatch.kits.metrics import Metrics
from jobwatch.kits.ratelimit import TokenBucket
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError, Unreachable

# The polling side's logger (watchbook.py): one place to look for what befell a watch.
log = logging.getLogger("jobwatch.control.runtime")

RETRY_DELAY = 1.0  # after a failed deletion, doubling with each failure in a row
MAX_RETRY_DELAY = 300.0
# A run this much before its due time (the scheduler releases a hair early) still goes.
EARLY = 0.01
FAILED_REASON = "DeleteFailed"


class Reaper:
    """Plans and carries out the deletion of this replica's finished watches that have
    a TTL (see the module docstring)."""

    def __init__(
        self,
        book: WatchBook,
        api: KubeApi,
        metrics: Metrics,
        ownership: Ownership | None,
        *,
        qps: float,
        burst: int,
        observe: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self._book, self._api, self._metrics, self._ownership = book, api, metrics, ownership
        self._bucket = TokenBucket(qps, burst, book.clock)
        # Takes in an object read after a conflict, as an event of it would be.
        self._observe = observe

    def seen(self, key: Key, watch: Watch, body: Mapping[str, Any]) -> None:
        """Decides again on the deletion of `watch` from `body`, a version of its object
        as stored; plans it, moves it or cancels it."""
        if not watch.finished:
            return  # a watch that has not ended has a poll planned, nothing to delete
        expiry = expiry_of(body)
        deletion = watch.deletion
        if deletion is not None and deletion.expiry == expiry:
            return
        if expiry is None:
            # Only a newer generation cancels (the TTL removed, or an edit that is not
            # acknowledged yet): a version of the same generation that asks for nothing
            # is one older than the version decided on (an event delivered late).
            generation = generation_of(body)
            if deletion is not None and (generation or 0) > deletion.expiry.generation:
                watch.deletion = None
                self._book.scheduler.cancel(key)  # the only entry a finished watch has
            return
        if deletion is None:
            watch.deletion = Deletion(expiry)
        else:
            # Decided anew (a newer version): its turn in the budget is taken again.
            deletion.expiry, deletion.booked = expiry, False
        self._book.plan_deletion(key, expiry.due)

    async def run(self, key: Key) -> None:
        """The scheduler's run for a finished watch: its deletion, if due and this
        replica's. Never raises: a fault is retried like a failed request."""
        watch = self._book.watches.get(key)
        deletion = watch.deletion if watch is not None else None
        if watch is None or deletion is None or not watch.finished:
            return
        try:
            await self._run(key, watch, deletion)
        except Exception as exc:
            self._metrics.internal_errors.labels("deleting after the TTL").inc()
            log.error(
                "%s/%s: internal error while deleting after the TTL",
                key[0],
                key[1],
                exc_info=exc,
                extra=about(watch.ref),
            )
            if self._current(key, watch, deletion):
                self._failed(key, watch, deletion, "internal error", type(exc).__name__)

    async def _run(self, key: Key, watch: Watch, deletion: Deletion) -> None:
        if not still_ours(self._book, self._ownership, key):
            return
        expiry = deletion.expiry
        if seconds_left(expiry, self._book.wall()) > EARLY:
            self._book.plan_deletion(key, expiry.due)  # planned early: a resume, say
            return
        if not deletion.booked:
            wait = self._bucket.book(math.inf)
            assert wait is not None  # never over an infinite bound
            if wait > 0:
                # Served in order at the budget's rate: its turn comes then.
                deletion.booked = True
                self._book.scheduler.schedule(key, self._book.clock() + wait)
                return
        deletion.booked = False
        try:
            deleted = await self._api.delete_jobwatch(
                ObjectRef(key[0], key[1], expiry.uid), expiry.resource_version
            )
        except ApiError as exc:
            if exc.status == 409:
                self._metrics.ttl_deletions.labels("conflict").inc()
                await self._decide_again(key, watch, deletion)
                return
            if self._current(key, watch, deletion):
                self._failed(key, watch, deletion, f"HTTP {exc.status}", exc.message)
            return
        except Unreachable as exc:
            if self._current(key, watch, deletion):
                self._failed(key, watch, deletion, "no answer from the API server", str(exc))
            return
        self._done(key, watch, expiry, deleted=deleted)

    def _current(self, key: Key, watch: Watch, deletion: Deletion) -> bool:
        """Is this still the deletion planned for this watch (not replaced, decided anew
        or cancelled while the request was out)?"""
        return self._book.watches.get(key) is watch and watch.deletion is deletion

    def _done(self, key: Key, watch: Watch, expiry: Expiry, *, deleted: bool) -> None:
        ref = watch.ref
        self._metrics.ttl_deletions.labels("deleted" if deleted else "gone").inc()
        if deleted:
            log.info(
                "%s/%s deleted: spec.ttlSecondsAfterFinished %d s after completionTime %s (uid %s)",
                ref.namespace,
                ref.name,
                expiry.ttl,
                format_time(expiry.completion_time),
                expiry.uid,
                extra=about(ref),
            )
        watch.deletion = None
        if self._book.watches.get(key) is watch:
            self._book.forget(key)  # its DELETED event, still to come, finds nothing

    async def _decide_again(self, key: Key, watch: Watch, deletion: Deletion) -> None:
        """The object changed since the version decided on, or is a namesake: read it,
        and take it in like an event, so that its deletion is planned again, moved or
        cancelled, never silently dropped."""
        try:
            body = await self._api.read_jobwatch(*key)
        except (ApiError, Unreachable) as exc:
            if self._current(key, watch, deletion):
                self._failed(key, watch, deletion, "reading it after a conflict failed", str(exc))
            return
        if self._book.watches.get(key) is not watch:
            return  # forgotten or replaced meanwhile: whatever did it decided
        if body is None:
            self._book.forget(key)  # gone: deleted by someone else
            return
        expiry = deletion.expiry
        self._observe(body)
        if self._current(key, watch, deletion) and deletion.expiry == expiry:
            # Nothing newer was taken in (an event older than the one decided on, say):
            # tried again later rather than dropped.
            self._failed(key, watch, deletion, "conflict", "the object read was no newer")

    def _failed(self, key: Key, watch: Watch, deletion: Deletion, kind: str, detail: str) -> None:
        """A deletion that failed (`kind`: "HTTP 403", ...; `detail`: the API server's
        message, which names no token): tried again after a delay doubling per failure
        in a row, said in an Event and the log when a streak starts or its kind changes."""
        self._metrics.ttl_deletions.labels("failed").inc()
        deletion.tries += 1
        delay = min(RETRY_DELAY * 2 ** (deletion.tries - 1), MAX_RETRY_DELAY)
        ref = watch.ref
        if deletion.tries == 1 or kind != deletion.last_failure:
            hint = (
                " (the operator's RBAC needs the verb delete on jobwatches: its ClusterRole,"
                " or the Role in this namespace when it watches listed namespaces)"
                if kind == "HTTP 403"
                else ""
            )
            message = (
                f"deleting this JobWatch (spec.ttlSecondsAfterFinished) failed: {kind}"
                f"{': ' + detail if detail else ''}"
                f"{hint}; trying again in {delay:g}s, then less often, up to every "
                f"{MAX_RETRY_DELAY:g}s"
            )
            self._book.writer.warn(ref, FAILED_REASON, message)
            log.warning("%s/%s: %s", ref.namespace, ref.name, message, extra=about(ref))
        deletion.last_failure = kind
        self._book.scheduler.schedule(key, self._book.clock() + delay)
