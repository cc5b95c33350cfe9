"""Fakes of what the lease elector talks to, shared by test_elector.py and
test_interleavings.py: a clock, an in-memory Lease store with the API server's
optimistic concurrency, and a Handover that records what it was asked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobwatch.control.sharding.handed import Handed
from jobwatch.control.sharding.leases import bucket_of
from jobwatch.kube.errors import ApiError, Unreachable


def _copied(value: Any) -> Any:
    """A deep copy of a JSON value: what the API server sends is never what it keeps
    (copy.deepcopy does the same at several times the cost, most of a simulation's)."""
    if isinstance(value, Mapping):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class Written:
    """One write the store applied, for what the Leases said at any moment."""

    at: float
    holder: str
    duration: float


class Store:
    """Leases with resourceVersions: a write carrying a stale one is a 409. With a clock,
    it keeps each Lease's writes (`history`), so a test can tell who held what when."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False
        self.writes = 0
        self.clock = clock
        self.history: dict[str, list[Written]] = {}

    def _check(self) -> None:
        if self.down:
            raise Unreachable("the API server does not answer")

    def _stored(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes += 1
        stored: dict[str, Any] = _copied(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        name = stored["metadata"]["name"]
        self.leases[name] = stored
        if self.clock is not None:
            spec = stored.get("spec") or {}
            written = Written(
                self.clock.now,
                str(spec.get("holderIdentity") or ""),
                float(spec.get("leaseDurationSeconds") or 0),
            )
            self.history.setdefault(name, []).append(written)
        copied: dict[str, Any] = _copied(stored)
        return copied

    async def list_leases(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self._check()
        key, _, value = selector.partition("=")
        return [_copied(b) for b in self.leases.values() if b["metadata"]["labels"][key] == value]

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self._check()
        if body["metadata"]["name"] in self.leases:
            raise ApiError(409, "already exists")
        return self._stored(body)

    async def replace_lease(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        self._check()
        current = self.leases.get(name)
        if current is None:
            raise ApiError(404, "not found")
        if current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            raise ApiError(409, "the object has been modified")
        return self._stored(body)

    async def delete_lease(self, namespace: str, name: str) -> None:
        self._check()
        self.leases.pop(name, None)

    def holder(self, bucket: int) -> str:
        lease = self.leases.get(f"jobwatch-bucket-{bucket:03d}")
        return str(lease["spec"]["holderIdentity"]) if lease else ""

    def holder_at(self, name: str, at: float) -> Written | None:
        """The last write of Lease `name` applied at or before `at`."""
        last = None
        for written in self.history.get(name, ()):
            if written.at > at:
                break
            last = written
        return last


class Handover:
    """The runtime's side: `timing` is what it hands over for each watch."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.adopted = 0
        self.adoptions: list[frozenset[int]] = []
        self.resumed: list[frozenset[int]] = []
        self.dropped: list[frozenset[int]] = []
        self.handed: list[frozenset[int]] = []
        self.timing: dict[tuple[str, str], Handed] = {}

    def adopt(self, buckets: frozenset[int]) -> None:
        self.adopted += 1
        self.adoptions.append(buckets)

    def resume(self, buckets: frozenset[int]) -> None:
        self.resumed.append(buckets)

    def drop(self, buckets: frozenset[int]) -> None:
        self.dropped.append(buckets)

    async def hand_over(
        self, buckets: frozenset[int], budget: float
    ) -> dict[tuple[str, str], Handed]:
        self.handed.append(buckets)
        return {
            key: timing
            for key, timing in self.timing.items()
            if bucket_of(*key, self.buckets) in buckets
        }
