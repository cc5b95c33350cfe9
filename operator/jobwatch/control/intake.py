"""Turns JobWatch events and adopted objects into watches: new, resumed after a restart
or a takeover, edited, suspended, deleted.

Layer: control.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from jobwatch.control.handover import take_over
from jobwatch.control.hostwaits import Key
from jobwatch.control.reaper import Reaper
from jobwatch.control.sharding.adoption import Adoption
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.control.watchbook import WatchBook, log
from jobwatch.core import policy
from jobwatch.core.expressions import Cel, CompiledWatch, ExpressionError
from jobwatch.core.refs import ObjectRef
from jobwatch.core.spec import SpecError, WatchSpec, parse_spec, spec_digest
from jobwatch.core.watch import Watch
from jobwatch.kits.logs import about
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import KubeApi


class _Parsed(NamedTuple):
    spec: WatchSpec | None
    compiled: CompiledWatch | None
    digest: str
    problem: str | None  # why the spec is invalid


class Intake:
    """Takes in each event of a JobWatch (and, with replicas, each object adopted with a
    bucket) as the watch it describes."""

    def __init__(
        self,
        book: WatchBook,
        api: KubeApi,
        metrics: Metrics,
        ownership: Ownership | None,
        cel: Cel,
        *,
        reaper: Reaper,
    ) -> None:
        self._book, self._metrics, self._cel = book, metrics, cel
        self._reaper = reaper  # deletions after the TTL, decided on each version seen
        # With replicas sharing the fleet: the watches of the buckets this one holds.
        # None: a single replica, which takes in and polls every JobWatch it sees.
        self._ownership = ownership
        self.adoption = (
            Adoption(ownership, api.read_jobwatch, self._take_in_adopted)
            if ownership is not None
            else None
        )

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Takes one watch event of a JobWatch. Cheap: our own status echoes end early.

        Never raises: an object that cannot be taken in must not stop the informer (it
        would replay the event forever, or never finish its listing, and so blind the
        operator for every other JobWatch). It is that object's error instead.
        """
        try:
            self._observe(event_type, body)
        except Exception as exc:
            self._adoption_fault(body, exc)

    def _observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if self.adoption is not None and not self.adoption.note(event_type, key, body):
            return  # another replica's, or being read for an adoption
        self._take_in(event_type, key, meta, body)

    def _take_in_adopted(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """An object read (or an event held) for an adoption: taken in like an event."""
        try:
            meta = body.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")))
            self._take_in(event_type, key, meta, body)
        except Exception as exc:
            self._adoption_fault(body, exc)

    def keep_only(self, namespace: str | None, keys: set[Key]) -> None:
        """After a fresh list of `namespace` (None: all): forgets the watches not in it,
        deleted while no watch stream was open."""
        gone = [
            key
            for key in self._book.watches
            if (namespace is None or key[0] == namespace) and key not in keys
        ]
        for key in gone:
            self._book.forget(key)
        if self.adoption is not None:
            self.adoption.keep_only(namespace, keys)

    def _take_in(
        self,
        event_type: str | None,
        key: Key,
        meta: Mapping[str, Any],
        body: Mapping[str, Any],
    ) -> None:
        current = self._book.watches.get(key)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self._book.forget(key)
            return
        generation = int(meta.get("generation") or 0)
        uid = str(meta.get("uid"))
        if current is not None and current.ref.uid == uid and current.generation >= generation:
            # Our own status echo, or an event older than what was read. A finished
            # watch's deletion after its TTL is decided on each version stored (the
            # echo of its end write first of all): it names the version in its DELETE.
            if current.finished and current.generation == generation:
                self._reaper.seen(key, current, body)
            return
        if current is not None and current.ref.uid != uid:
            self._book.forget(key)
            current = None
        self._adopt(key, ObjectRef(key[0], key[1], uid), generation, body, current)

    def _adoption_fault(self, body: Mapping[str, Any], exc: Exception) -> None:
        """What is left when taking in an object failed: the watch ends `Failed` with
        reason `InternalError` and says so (an edit of its spec tries again)."""
        self._metrics.internal_errors.labels("adopting").inc()
        meta = body.get("metadata") if isinstance(body, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        namespace, name, uid = (str(meta.get(k)) for k in ("namespace", "name", "uid"))
        log.error(
            "%s/%s could not be taken in",
            namespace,
            name,
            exc_info=exc,
            extra=about(ObjectRef(namespace, name, uid)),
        )
        try:
            key = (namespace, name)
            self._book.forget(key)
            generation = int(meta.get("generation") or 0)
            now = self._book.wall()
            watch = Watch(
                ref=ObjectRef(namespace, name, uid),
                generation=generation,
                spec_hash=f"internal:{generation}",
                spec=None,
                compiled=None,
                suspended=False,
                start_time=now,
                deadline=now,
            )
            self._book.watches[key] = watch
            message = (
                f"the operator could not take this JobWatch in ({type(exc).__name__}); "
                "its log has the details; an edit of the spec tries again"
            )
            self._book.finish(watch, policy.internal_failure(message), now)
        except Exception:
            log.exception(
                "%s/%s: its error could not be recorded either",
                namespace,
                name,
                extra=about(ObjectRef(namespace, name, uid)),
            )

    def _adopt(
        self,
        key: Key,
        ref: ObjectRef,
        generation: int,
        body: Mapping[str, Any],
        current: Watch | None,
    ) -> None:
        raw_spec = body.get("spec") or {}
        self._book.writer.stored(ref, body.get("status"))
        stored = body.get("status") or {}
        now = self._book.wall()
        parsed = _parse(self._cel, key, ref, generation, raw_spec)
        spec = parsed.spec
        timeout = spec.timeout if spec else 0.0
        watch = Watch(
            ref=ref,
            generation=generation,
            spec_hash=parsed.digest,
            spec=spec,
            compiled=parsed.compiled,
            suspended=bool(spec and spec.suspend),
            start_time=now,
            deadline=now + timeout,
        )
        same_watch = current is not None and current.spec_hash == parsed.digest
        resumed = same_watch or (stored.get("specHash") == parsed.digest and "startTime" in stored)
        if current is not None and same_watch:
            # A change of `suspend` or `ttlSecondsAfterFinished` alone: the same watch
            # goes on (a finished one stays finished; its deletion is decided again).
            current.generation, current.suspended = generation, watch.suspended
            if watch.spec is not None:
                current.spec = watch.spec
            watch = current
        elif resumed:
            watch.resume_from(stored)
            take_over(self._ownership, key, watch, resumed=True)
        elif current is not None:
            # A new watch of the same object (a spec edit): the same job service may be
            # polled, so the timing floor counts from the old watch's last request.
            watch.last_end, watch.not_before = current.last_end, current.not_before
        else:
            take_over(self._ownership, key, watch, resumed=False)
        self._book.watches[key] = watch
        self._begin(key, watch, parsed.problem, stored, now, resumed=resumed, same_watch=same_watch)
        self._reaper.seen(key, watch, body)  # finished (as stored, or just now): its TTL

    def _begin(
        self,
        key: Key,
        watch: Watch,
        problem: str | None,
        stored: Mapping[str, Any],
        now: float,
        *,
        resumed: bool,
        same_watch: bool,
    ) -> None:
        """Writes what taking the watch in changed and plans its next poll (`problem`: its
        spec is invalid, which ends it)."""
        book, generation = self._book, watch.generation
        if problem is not None:
            if resumed and watch.finished:
                # Reported before this restart: an end is final (no new completionTime,
                # no second Event); only a new generation is acknowledged.
                if generation != stored.get("observedGeneration"):
                    book.writer.submit(watch, urgent=True)
                return
            book.finish(watch, policy.invalid_spec(problem), now)
            return
        if not resumed:
            book.writer.submit(watch, urgent=True)
            book.writer.event(watch)
        elif same_watch or generation != stored.get("observedGeneration"):
            book.writer.submit(watch, urgent=True)
        if watch.finished:
            return
        if watch.suspended:
            due = watch.deadline  # only to time it out: the deadline keeps counting
        elif resumed and not same_watch and watch.next_poll_time:
            # An operator restart or a takeover: keep the planned rhythm.
            due = book.paced(watch.next_poll_time, watch)
        else:
            due = book.paced(now, watch)
        book.plan(key, watch, due)


def _parse(cel: Cel, key: Key, ref: ObjectRef, generation: int, raw_spec: Any) -> _Parsed:
    """The spec and its expressions; a spec whose expressions do not compile is kept
    (its timeout still sets the deadline the invalid watch reports)."""
    spec: WatchSpec | None = None
    compiled: CompiledWatch | None = None
    try:
        spec = parse_spec(raw_spec)
        compiled = cel.compile(spec)
        return _Parsed(spec, compiled, spec_digest(spec), None)
    except (SpecError, ExpressionError) as exc:
        return _Parsed(spec, compiled, f"invalid:{generation}", str(exc))
    except Exception as exc:  # a spec that crashes the parser is still the spec's fault
        log.warning(
            "%s/%s: spec could not be parsed", key[0], key[1], exc_info=exc, extra=about(ref)
        )
        problem = f"spec could not be parsed ({type(exc).__name__})"
        return _Parsed(spec, compiled, f"invalid:{generation}", problem)
