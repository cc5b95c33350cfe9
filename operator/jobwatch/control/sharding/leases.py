"""Leases as data (layer: control, sharding; pure): the settings of a lease group, the
bucket of a JobWatch, a Lease as listed (`Seen`) and the body this replica writes.

A replica that shares the fleet holds buckets through `coordination.k8s.io` Leases, and
a member Lease of its own (elector.py runs the rounds).
"""

from __future__ import annotations

import datetime
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobwatch.control.sharding.handed import HANDOVER_ANNOTATION

GROUP_LABEL = "jobwatch.dev/lease-group"
ROLE_LABEL = "jobwatch.dev/lease-role"
BUCKET, MEMBER = "bucket", "member"
# On every Lease this replica writes: the settings that decide which replica owns a
# JobWatch. Replicas that disagree on them would poll some JobWatches twice and some not
# at all, so a replica that meets another value than the one in force takes nothing.
AGREEMENT_ANNOTATION = "jobwatch.dev/agreement"


def bucket_of(namespace: str, name: str, buckets: int) -> int:
    """The bucket of a JobWatch: stable across processes and Python versions."""
    return zlib.crc32(f"{namespace}/{name}".encode()) % buckets


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    namespace: str  # where the Leases live: the operator's own namespace
    identity: str  # this replica, unique: pod name and a random suffix
    group: str = "jobwatch"  # Lease name prefix; one per operator Deployment
    buckets: int = 32
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    # The other settings replicas must agree on besides `buckets` (env name, value).
    scope: tuple[tuple[str, str], ...] = ()

    @property
    def agreement(self) -> str:
        """What `AGREEMENT_ANNOTATION` says for this replica."""
        return json.dumps(
            {"JOBWATCH_BUCKETS": str(self.buckets), **dict(self.scope)}, sort_keys=True
        )

    def bucket_lease(self, bucket: int) -> str:
        return f"{self.group}-bucket-{bucket:03d}"

    @property
    def member_lease(self) -> str:
        return f"{self.group}-member-{_dns_label(self.identity)}"[:253]


@dataclass(slots=True)
class Seen:
    """A Lease as last listed, and since when (this replica's clock) it is unchanged."""

    name: str
    role: str
    holder: str
    duration: float
    version: str
    since: float
    body: dict[str, Any] = field(repr=False)
    transitions: int = 0
    agreement: str | None = None  # AGREEMENT_ANNOTATION; None from older versions

    def expired(self, now: float) -> bool:
        return not self.holder or now - self.since >= self.duration

    def free_since(self, now: float) -> float | None:
        """Since when nobody holds it: released, or expired (None while held)."""
        if not self.holder:
            return self.since
        if now - self.since >= self.duration:
            return self.since + self.duration
        return None


def observe(
    listed: list[dict[str, Any]], before: Mapping[str, Seen], now: float, duration: float
) -> dict[str, Seen]:
    """The Leases of a listing made at `now`, each unchanged since it was first seen so
    (`before`: as last listed); `duration`: for a Lease that does not say its own."""
    seen: dict[str, Seen] = {}
    for body in listed:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        name = str(meta.get("name"))
        version = str(meta.get("resourceVersion"))
        prior = before.get(name)
        transitions = spec.get("leaseTransitions")
        agreement = (meta.get("annotations") or {}).get(AGREEMENT_ANNOTATION)
        seen[name] = Seen(
            name=name,
            role=str((meta.get("labels") or {}).get(ROLE_LABEL, "")),
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or duration),
            version=version,
            since=prior.since if prior is not None and prior.version == version else now,
            body=body,
            transitions=transitions if isinstance(transitions, int) else 0,
            agreement=agreement if isinstance(agreement, str) else None,
        )
    return seen


def lease_body(
    settings: LeaseSettings,
    name: str,
    *,
    role: str,
    holder: str,
    duration: float,
    before: Seen | None,
    stamp: str,
) -> dict[str, Any]:
    """The Lease `name` as this replica writes it at `stamp` (MicroTime), held by `holder`
    (none: released), written over `before` as last listed (None: created)."""
    spec: dict[str, Any] = {
        "holderIdentity": holder,
        "leaseDurationSeconds": max(1, round(duration)),
        "renewTime": stamp,
    }
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": {GROUP_LABEL: settings.group, ROLE_LABEL: role},
    }
    if before is None:
        spec.update(acquireTime=stamp, leaseTransitions=0)
        metadata["annotations"] = {AGREEMENT_ANNOTATION: settings.agreement}
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }
    old = before.body.get("spec") or {}
    transitions = before.transitions
    if before.holder != holder:
        if holder:
            transitions += 1
            spec["acquireTime"] = stamp
    else:
        spec["acquireTime"] = old.get("acquireTime") or stamp
    spec["leaseTransitions"] = transitions
    metadata["resourceVersion"] = before.version
    # A handover is for the one taking the Lease right after its release: gone with
    # the first write after that.
    annotations = dict(before.body["metadata"].get("annotations") or {})
    annotations.pop(HANDOVER_ANNOTATION, None)
    annotations[AGREEMENT_ANNOTATION] = settings.agreement
    metadata["annotations"] = annotations
    return {**before.body, "metadata": {**before.body["metadata"], **metadata}, "spec": spec}


def name_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name"))


def micro_time(epoch: float) -> str:
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label or "replica"
