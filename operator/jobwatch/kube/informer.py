"""Our own list-and-watch of JobWatches, feeding `Runtime.observe`.

Not kopf's watching: kopf hands every event, our own status echoes included, to a
per-object worker that deep-copies the body, detects causes and builds handler
arguments, several milliseconds of CPU per event. At 10k JobWatches its initial
listing took 30-60 s of CPU away from polling, so the last watches were adopted
minutes after start-up. Here an event costs one JSON parse and a few dict lookups.

Per namespace (or once cluster-wide): a paged LIST, then a WATCH from the list's
resourceVersion with bookmarks, resumed where it ended; a 410 Gone means list again.
A re-list also forgets the watches whose JobWatches disappeared meanwhile.

Errors the API server answers back off up to 30 s. While it does not answer at all (it
restarts, say), the informer tries again about every second: a refused connection
costs the server nothing, and what changed while it was away must be taken in within
about a second of its return, not after a backoff grown during a minute of outage.
Nor do the errors of its first seconds back count (503 before its paths are installed,
429 while its storage initialises, 403 before its RBAC rules are loaded): they end on
their own, and are retried about every second as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import Expired, Unreachable

log = logging.getLogger(__name__)

Key = tuple[str, str]
MAX_BACKOFF = 30.0
# Between attempts while the API server does not answer at all, and while it starts up
# after that (see the module's doc): errors answered this long after its return count.
UNREACHABLE_RETRY = 1.0
START_UP_GRACE = 30.0
# A stream the server ends at once, again and again, must not become a busy loop of
# requests: one that lasted less than this is followed by a pause of this length.
MIN_STREAM_SECONDS = 1.0


class Informer:
    def __init__(
        self,
        api: KubeApi,
        namespaces: tuple[str, ...],
        labels: tuple[tuple[str, str], ...],
        *,
        observe: Callable[[str, Mapping[str, Any]], None],
        keep_only: Callable[[str | None, set[Key]], None],
        listing: Callable[[str | None], None] | None = None,
        before_listing: Callable[[], Awaitable[None]] | None = None,
        server_timeout: int = 300,
    ) -> None:
        self._api, self._labels = api, labels
        self._before_listing = before_listing
        self._scopes: tuple[str | None, ...] = namespaces or (None,)
        self._observe, self._keep_only, self._listing = observe, keep_only, listing
        # Set by `relist`: the scope's stream is closed and it is listed again.
        self._relist = {scope: asyncio.Event() for scope in self._scopes}
        self._server_timeout = server_timeout
        self.synced = asyncio.Event()  # every scope listed once
        self._listed: set[str | None] = set()

    async def run(self) -> None:
        if self._before_listing is not None:
            await self._before_listing()
        async with asyncio.TaskGroup() as group:
            for scope in self._scopes:
                group.create_task(self._follow(scope), name=f"jobwatch-informer-{scope or '*'}")

    async def _follow(self, scope: str | None) -> None:
        loop = asyncio.get_running_loop()
        failures = 0  # errors the API server answered, in a row
        reach = _Reach(_where(scope))
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list(scope)
                    reach.ok(loop.time())
                opened = loop.time()
                resume = await self._watch_unless_relisted(
                    scope, version, lambda: reach.ok(loop.time())
                )
                failures = 0
                if resume is None:
                    version = None  # asked to list again: at once
                    continue
                version = resume
                if loop.time() - opened < MIN_STREAM_SECONDS:
                    await asyncio.sleep(MIN_STREAM_SECONDS)
            except Expired:
                log.info("watch of %s expired; listing again", _where(scope))
                reach.ok(loop.time())
                version = None
            except Unreachable as exc:
                reach.unanswered(loop.time(), exc)
                await asyncio.sleep(_jittered(UNREACHABLE_RETRY))
            except Exception as exc:
                if reach.starting_up(loop.time()):
                    delay = _jittered(UNREACHABLE_RETRY)
                else:
                    failures += 1
                    delay = _jittered(min(MAX_BACKOFF, 0.5 * 2**failures))
                log.warning(
                    "watching %s failed (%s); again in %.1f s",
                    _where(scope),
                    exc or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    def relist(self) -> None:
        """Closes every scope's stream and lists it again (buckets were taken: their
        watches are adopted from that list, see control.sharding.ownership)."""
        for event in self._relist.values():
            event.set()

    async def _watch_unless_relisted(
        self, scope: str | None, version: str, opened: Callable[[], None]
    ) -> str | None:
        """The stream until it ends (where to resume), or None once `relist` asks."""
        asked = self._relist[scope]
        if asked.is_set():
            return None
        watching = asyncio.ensure_future(self._watch(scope, version, opened))
        waiting = asyncio.ensure_future(asked.wait())
        try:
            await asyncio.wait((watching, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not watching.done():
                watching.cancel()
                await asyncio.wait((watching,))
        if watching.cancelled():
            return None
        return watching.result()

    async def _list(self, scope: str | None) -> str:
        # From here on the stream of this scope is closed: what the list shows is newer
        # than any event it carried.
        self._relist[scope].clear()
        if self._listing is not None:
            self._listing(scope)
        started = asyncio.get_running_loop().time()
        seen: set[Key] = set()
        version: str | None = None
        async for page, page_version in self._api.list_jobwatches(scope, self._labels):
            version = page_version
            for body in page:
                meta = body.get("metadata") or {}
                seen.add((str(meta.get("namespace")), str(meta.get("name"))))
                self._observe("ADDED", body)
        self._keep_only(scope, seen)
        log.debug("listed %d JobWatches in %s", len(seen), _where(scope))
        if scope not in self._listed:
            elapsed = asyncio.get_running_loop().time() - started
            log.info("listed %d JobWatches in %s in %.1f s", len(seen), _where(scope), elapsed)
            self._listed.add(scope)
            if len(self._listed) == len(self._scopes):
                self.synced.set()
        if not version:
            raise RuntimeError("the list response carried no resourceVersion")
        return version

    async def _watch(self, scope: str | None, version: str, opened: Callable[[], None]) -> str:
        """Follows the stream until the server ends it; returns where to resume."""
        events = self._api.watch_jobwatches(
            scope, version, self._labels, self._server_timeout, opened=opened
        )
        async for kind, body in events:
            meta = body.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind != "BOOKMARK":
                self._observe(kind, body)
        return version


@dataclass
class _Reach:
    """Whether one scope's requests get answers: an outage, and the start-up after it."""

    where: str
    away_since: float | None = None  # the first request in a row without an answer
    back_at: float | None = None  # the first answer after that

    def unanswered(self, now: float, exc: Exception) -> None:
        if self.away_since is None:
            self.away_since, self.back_at = now, None
            log.warning(
                "the API server does not answer (%s); watching %s again every %.0f s",
                type(exc).__name__,
                self.where,
                UNREACHABLE_RETRY,
            )

    def starting_up(self, now: float) -> bool:
        """An error answered now comes from a server that was away a moment ago."""
        if self.away_since is None:
            return False
        if self.back_at is None:
            self.back_at = now
        return now - self.back_at < START_UP_GRACE

    def ok(self, now: float) -> None:
        if self.away_since is not None:
            away = (self.back_at or now) - self.away_since
            log.info("the API server answers %s again, after %.1f s away", self.where, away)
        self.away_since = self.back_at = None


def _jittered(delay: float) -> float:
    return delay * (0.5 + random.random() / 2)


def _where(scope: str | None) -> str:
    return f"namespace {scope}" if scope is not None else "all namespaces"
