"""The requests the elector makes (layer: control, sharding): listing the group's
Leases, and taking, renewing and releasing them, each attempt bounded and a failed one
retried within the renew deadline; and this replica's view of the Leases as last
listed (`LeaseBook.seen`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from jobwatch.control.sharding.handed import HANDOVER_ANNOTATION, Handed, encode_handover
from jobwatch.control.sharding.leases import (
    BUCKET,
    GROUP_LABEL,
    MEMBER,
    LeaseSettings,
    Seen,
    lease_body,
    micro_time,
    name_of,
    observe,
)
from jobwatch.kube.errors import ApiError, Unreachable

T = TypeVar("T")

log = logging.getLogger(__name__)

# Member Leases of replicas gone this many lease durations are deleted by anyone.
MEMBER_GARBAGE_DURATIONS = 20
# Each attempt of a Lease request may take this share of the renew deadline, and a
# failed one (no answer, 429, 5xx) is tried again while within RETRY_SHARE of it: one
# stalled connection then costs a retry, not the bucket. (A quarter cut answers a busy
# API server was about to give: its renewals then failed more often than they waited.)
REQUEST_SHARE = 1 / 2
RETRY_SHARE = 3 / 4
RETRY_PAUSE_SHARE = 1 / 20


class LeaseStore(Protocol):
    """The few Lease requests the elector makes (kube.KubeApi implements them). Errors
    the API server answers are `ApiError`s; 409 means someone else wrote first."""

    async def list_leases(self, namespace: str, selector: str) -> list[dict[str, Any]]: ...

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def replace_lease(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]: ...

    async def delete_lease(self, namespace: str, name: str) -> None: ...


class LeaseBook:
    """The group's Leases as this replica last listed them (`seen`, and `absent`: the
    buckets without a Lease yet, since when), and every request about them."""

    def __init__(
        self,
        settings: LeaseSettings,
        store: LeaseStore,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._settings, self._store = settings, store
        self._clock, self._wall, self._sleep = clock, wall, sleep
        self.seen: dict[str, Seen] = {}
        self.absent: dict[int, float] = {}  # buckets without a Lease: since when

    @property
    def selector(self) -> str:
        return f"{GROUP_LABEL}={self._settings.group}"

    async def list_group(self) -> list[dict[str, Any]]:
        """The group's Leases (retried as any Lease request)."""
        settings = self._settings
        return await self._retrying(
            lambda: self._store.list_leases(settings.namespace, self.selector)
        )

    def forget(self) -> None:
        """Forgets what was listed: the next listing starts every expiry anew."""
        self.seen = {}

    def observe(self, listed: list[dict[str, Any]], now: float) -> None:
        self.seen = observe(listed, self.seen, now, self._settings.lease_duration)
        for bucket in range(self._settings.buckets):
            if self._settings.bucket_lease(bucket) in self.seen:
                self.absent.pop(bucket, None)
            else:
                self.absent.setdefault(bucket, now)

    async def _retrying(self, request: Callable[[], Awaitable[T]]) -> T:
        """One Lease request: each attempt bounded by REQUEST_SHARE of the renew deadline,
        and one that got no answer, a 429 or a 5xx tried again, all within RETRY_SHARE
        of it. A write sent again after an answer was lost meets a 409 (its own first
        attempt changed the Lease): the next listing says whose it is."""
        settings = self._settings
        end = self._clock() + settings.renew_deadline * RETRY_SHARE
        pause = settings.renew_deadline * RETRY_PAUSE_SHARE
        while True:
            try:
                left = end - self._clock()
                async with asyncio.timeout(min(settings.renew_deadline * REQUEST_SHARE, left)):
                    return await request()
            except ApiError as exc:
                if exc.status != 429 and exc.status < 500:
                    raise
                failure: Exception = exc
            except (TimeoutError, Unreachable) as exc:
                failure = exc
            if self._clock() + pause >= end:
                raise failure
            await self._sleep(pause)

    def _body(self, name: str, role: str, holder: str, duration: float) -> dict[str, Any]:
        return lease_body(
            self._settings,
            name,
            role=role,
            holder=holder,
            duration=duration,
            before=self.seen.get(name),
            stamp=micro_time(self._wall()),
        )

    async def _write(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        namespace = self._settings.namespace
        if "resourceVersion" not in body["metadata"]:
            written = await self._store.create_lease(namespace, body)
        else:
            written = await self._store.replace_lease(namespace, name, body)
        # What we wrote is what others see changing: it does not start an expiry.
        self._observe_one(written, self._clock())
        return written

    def _observe_one(self, body: dict[str, Any], now: float) -> None:
        others = [lease.body for name, lease in self.seen.items() if name != name_of(body)]
        self.observe([*others, body], now)

    async def renew_member(self) -> None:
        settings = self._settings
        name = settings.member_lease

        async def attempt() -> None:
            body = self._body(name, MEMBER, settings.identity, settings.lease_duration)
            await self._write(name, body)

        await self._retrying(attempt)

    async def hold(self, bucket: int) -> float | None:
        """Writes this replica into the bucket's Lease: until when it may use the bucket
        (renew deadline from when the write that succeeded was sent), or None when
        someone else wrote the Lease since it was listed."""
        settings = self._settings
        name = settings.bucket_lease(bucket)

        async def attempt() -> float:
            sent = self._clock()
            await self._write(
                name, self._body(name, BUCKET, settings.identity, settings.lease_duration)
            )
            return sent + settings.renew_deadline

        try:
            return await self._retrying(attempt)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def release(self, bucket: int, handed: Mapping[tuple[str, str], Handed]) -> None:
        """Writes the bucket's Lease released (no holder, 1 s), with the handover."""
        settings = self._settings
        name = settings.bucket_lease(bucket)
        text = encode_handover(handed, self._wall())

        async def attempt() -> None:
            body = self._body(name, BUCKET, "", 1.0)
            if text is not None:
                body["metadata"].setdefault("annotations", {})[HANDOVER_ANNOTATION] = text
            await self._write(name, body)

        try:
            try:
                await self._retrying(attempt)
            except ApiError as exc:
                # Changed since listed: most often by this replica's own renewal whose
                # answer was lost (a round cut short by SIGTERM). Still ours: again.
                if exc.status != 409:
                    raise
                self.observe(
                    await self._store.list_leases(settings.namespace, self.selector), self._clock()
                )
                lease = self.seen.get(name)
                if lease is None or lease.holder != settings.identity:
                    return
                await self._retrying(attempt)
        except Exception as exc:  # it expires on its own
            log.warning("could not release %s (%s)", name, why_failed(exc))

    async def collect_garbage(self) -> None:
        """Member Leases of replicas long gone (kill -9, a lost node)."""
        now = self._clock()
        limit = MEMBER_GARBAGE_DURATIONS * self._settings.lease_duration
        for lease in list(self.seen.values()):
            if lease.role == MEMBER and now - lease.since > limit:
                try:
                    await self._store.delete_lease(self._settings.namespace, lease.name)
                except ApiError as exc:
                    if exc.status not in (404, 409):
                        raise

    async def leave(self) -> None:
        """Deletes this replica's member Lease."""
        await self._store.delete_lease(self._settings.namespace, self._settings.member_lease)


def why_failed(exc: BaseException) -> str:
    """An exception for the log: its message, or its type when it has none (a timeout)."""
    return str(exc) or type(exc).__name__
