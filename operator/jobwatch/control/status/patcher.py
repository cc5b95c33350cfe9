"""One status write and its repair (layer: control): rendering a watch's status,
sending only what changed, fenced, and what a refusal means.

- a status identical to the one last written is never sent, and a write sends only the
  fields that changed since (a progress write: attempts, poll times, last response);
- a status the API server cannot take (not encodable, or refused as invalid) is written
  again without its result and last response, saying why, instead of being retried
  forever;
- every status says which replica wrote it (`holder`), every write is fenced by what the
  writer last knew of the stored status (core.patch.Fence: the API server refuses it if the
  holder or phase changed since), and a refused write reads the object once: an end
  another replica wrote stands, anything else is written over whole (`_refused`);
- whether the object is still this replica's (`may_write`) is asked right before each
  request.

What to do next (retry, give up, drop the object) is the writer's: `write` says what
happened (`Sent`, `ForeignEnd`).
"""

from __future__ import annotations

import enum
import logging
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobwatch.core import render as status_render
from jobwatch.core.patch import EncodedStatus, Fence, encode_json
from jobwatch.core.policy import END_PHASES, Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch
from jobwatch.kits.logs import about
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError

log = logging.getLogger(__name__)

_END_PHASES = frozenset(phase.value for phase in END_PHASES)


class Sent(enum.Enum):
    """What became of one write."""

    DONE = enum.auto()  # written, unchanged, or nothing more to do (gone, not retriable)
    RETRY = enum.auto()  # to be written again after the retry delay
    UNANSWERED = enum.auto()  # no answer: it may have been applied
    NOT_OURS = enum.auto()  # the object is no longer this replica's to write


@dataclass(frozen=True, slots=True)
class ForeignEnd:
    """The write was refused because another replica ended the watch meanwhile: the
    object as stored, whose end stands."""

    body: dict[str, Any]


@dataclass(slots=True)
class _Written:
    """What the writer knows of the status an object holds: the hashes of what it last
    wrote there, when, and whether that is what the object holds (False: a reduced
    status went out instead, see `without_endpoint_parts`; the next write is whole)."""

    digest: array[int]
    at: float
    exact: bool


class _NotOurs(Exception):
    """The object is no longer this replica's to write (`may_write`)."""


def _end_stands(watch: Watch, stored: object) -> bool:
    """Whether a stored status another writer left is an end that `watch` must not
    undo: an end of the same generation, while `watch` has not ended."""
    if not isinstance(stored, dict) or watch.finished:
        return False
    ended = stored.get("phase") in _END_PHASES
    return ended and stored.get("observedGeneration") == watch.generation


class StatusPatcher:
    """Sends one watch's status at a time; remembers, per object, what it wrote there
    and the fence its next write carries."""

    def __init__(
        self,
        api: KubeApi,
        metrics: Metrics,
        *,
        identity: str,
        wall: Callable[[], float],
        clock: Callable[[], float],
        may_write: Callable[[ObjectRef], bool],
        tracked: Callable[[ObjectRef], bool],
    ) -> None:
        self._api, self._metrics = api, metrics
        self._wall, self._clock = wall, clock
        # With replicas: is the object's bucket still this one's? A replica that lost it
        # (renew deadline passed, taken over) must not overwrite the new holder's status.
        # Asked right before each request: a write waits for a token, a retry, an answer.
        self._may_write = may_write
        # Whether the writer still knows the object (not forgotten, i.e. deleted, while a
        # request was out): only then is what was learnt of it kept.
        self._tracked = tracked
        # Every status written says who wrote it (`status.holder`), and every write tests
        # that the object still holds what this writer last knew of it (see Fence): the
        # fence a write of each phase leaves, one object for all the objects.
        self._identity = identity
        self._own = {phase.value: Fence(True, identity, phase.value) for phase in Phase}
        self._fences: dict[ObjectRef, Fence] = {}
        self._repairs: set[ObjectRef] = set()  # rewritten whole after a refusal
        self._written: dict[ObjectRef, _Written] = {}

    def stored(self, ref: ObjectRef, status: object) -> None:
        """The object's `status` as taken in (None: it has none): what its first write
        expects to find. This writer's own writes since know better and are kept."""
        self._fences.setdefault(ref, Fence.of(status))

    def forget(self, ref: ObjectRef) -> None:
        self._written.pop(ref, None)
        self._fences.pop(ref, None)
        self._repairs.discard(ref)

    def written_at(self, ref: ObjectRef) -> float | None:
        """When the object's status was last written (None: not by this writer)."""
        written = self._written.get(ref)
        return written.at if written is not None else None

    def _render(self, watch: Watch) -> tuple[dict[str, Any], dict[str, str]]:
        """The status to write for `watch`, and the JSON text of each field."""
        ref = watch.ref
        try:
            status = status_render.render(watch, self._wall(), self._identity)
        except Exception as exc:  # a bug must not leave the object without any status
            self._metrics.internal_errors.labels("rendering status").inc()
            log.error(
                "status of %s/%s: render failed",
                ref.namespace,
                ref.name,
                exc_info=exc,
                extra=about(ref),
            )
            status = status_render.minimal(watch, exc, self._identity)
        try:
            return status, status_render.field_texts(status, encode_json)
        except (TypeError, ValueError) as exc:  # NaN, a non-string key: never retry as is
            status = status_render.without_endpoint_parts(status, f"not encodable as JSON ({exc})")
            log.error(
                "status of %s/%s was not encodable", ref.namespace, ref.name, extra=about(ref)
            )
            return status, status_render.field_texts(status, status_render.encode_leniently)

    async def write(self, watch: Watch) -> Sent | ForeignEnd:
        """Writes the status of `watch`, unless it is the one written last."""
        ref = watch.ref
        status, texts = self._render(watch)
        digest = status_render.field_digest(texts)
        previous = self._written.get(ref)
        if previous is not None and previous.digest == digest:
            self._metrics.status_writes.labels("unchanged").inc()
            return Sent.DONE
        changed = None
        if previous is not None and previous.exact:
            changed = status_render.changed_fields(previous.digest, digest)
        try:
            exact = await self._send(watch, status, texts, changed)
        except _NotOurs:
            self._metrics.status_writes.labels("not_ours").inc()
            return Sent.NOT_OURS
        except ApiError as exc:
            if exc.gone:
                self._metrics.status_writes.labels("gone").inc()
                return Sent.DONE
            if exc.not_applied:
                return await self._refused(watch)
            self._metrics.status_writes.labels("error").inc()
            log.warning(
                "status write for %s/%s failed: %s", ref.namespace, ref.name, exc, extra=about(ref)
            )
            return Sent.RETRY if exc.retriable else Sent.DONE
        except Exception as exc:
            # No answer: the write may have been applied. The fence stays as it was; if
            # it was applied, the next write is refused and reads what the object holds.
            self._metrics.status_writes.labels("error").inc()
            log.warning(
                "status write for %s/%s failed: %s",
                ref.namespace,
                ref.name,
                type(exc).__name__,
                extra=about(ref),
            )
            return Sent.UNANSWERED
        repaired = ref in self._repairs
        self._repairs.discard(ref)
        self._metrics.status_writes.labels("repaired" if repaired else "written").inc()
        if self._tracked(ref):  # not forgotten while the write was out
            self._written[ref] = _Written(digest, self._clock(), exact)
            phase = str(status["phase"])
            self._fences[ref] = self._own.get(phase) or Fence(True, self._identity, phase)
        return Sent.DONE

    async def _patch(self, ref: ObjectRef, status: dict[str, Any]) -> None:
        """One PATCH of `status`, fenced; raises _NotOurs instead when the object is no
        longer this replica's to write at this very moment."""
        if not self._may_write(ref):
            raise _NotOurs
        await self._api.patch_status(ref, status, self._fences.get(ref))

    async def _send(
        self,
        watch: Watch,
        status: dict[str, Any],
        texts: dict[str, str],
        changed: tuple[str, ...] | None,
    ) -> bool:
        """Writes `status`: only the `changed` fields if known, else whole. True when the
        object now holds it, False when it was refused as invalid and written without
        what came from the endpoint instead."""
        ref = watch.ref
        try:
            await self._patch(ref, EncodedStatus(status, texts, changed))
            return True
        except ApiError as exc:
            if exc.status not in (400, 422) or exc.not_applied:
                raise  # a fence refusal: _refused reads what the object holds
            if changed is not None:
                # The new values are refused as fields (they may be fine as a whole
                # status): the status goes whole.
                return await self._send(watch, status, texts, None)
            if not any(status.get(key) is not None for key in status_render.FROM_ENDPOINT):
                raise
            # Refused as invalid (too large, a value the schema does not take): what
            # came from the endpoint goes, the rest of the status still gets out.
            self._metrics.status_writes.labels("invalid").inc()
            log.warning(
                "status of %s/%s refused (%s); writing it without result and last response",
                ref.namespace,
                ref.name,
                exc,
                extra=about(ref),
            )
            reason = f"refused by the API server (HTTP {exc.status})"
            await self._patch(ref, status_render.without_endpoint_parts(status, reason))
            return False

    async def _refused(self, watch: Watch) -> Sent | ForeignEnd:
        """A write refused by its fence: someone else wrote the object's status since
        this writer last knew it (another replica, or this one's own write whose answer
        was lost). One GET says what it holds. An end of this generation stands when
        ours is not an end: the watch goes back to the runtime, which takes it in as
        finished. Anything else is written over, whole, after the retry delay and with
        a token like any write, so that two writers fighting cannot spin."""
        ref = watch.ref
        self._metrics.status_writes.labels("refused").inc()
        try:
            body = await self._api.get_jobwatch(ref)
        except Exception as exc:
            log.warning(
                "status write for %s/%s refused, and reading the object failed: %s",
                ref.namespace,
                ref.name,
                exc if isinstance(exc, ApiError) else type(exc).__name__,
                extra=about(ref),
            )
            return Sent.RETRY  # refused again, it reads again
        if body is None:
            log.warning(
                "status write for %s/%s refused: the object is gone",
                ref.namespace,
                ref.name,
                extra=about(ref),
            )
            return Sent.DONE
        stored = body.get("status")
        theirs = Fence.of(stored)
        stands = _end_stands(watch, stored)
        log.warning(
            "status write for %s/%s refused: its status was written meanwhile by %s (phase %s)%s",
            ref.namespace,
            ref.name,
            theirs.holder or "an unknown writer",
            theirs.phase,
            "; that end stands" if stands else "; writing ours again, whole",
            extra=about(ref),
        )
        if stands:
            return ForeignEnd(body)
        if not self._tracked(ref):
            return Sent.DONE  # forgotten while the GET was out
        self._fences[ref] = theirs
        self._written.pop(ref, None)  # what the object holds is not ours: the next is whole
        self._repairs.add(ref)
        return Sent.RETRY
