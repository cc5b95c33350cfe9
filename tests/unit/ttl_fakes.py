"""An API server stand-in that holds JobWatches, for the tests of deletion after
spec.ttlSecondsAfterFinished (test_reaper.py).

Unlike runtime_fakes.FakeApi it keeps each object with a resourceVersion: a status write
is stored (a new version) and comes back to the runtime as a watch event, as on the
real API server, and a DELETE checks its uid and resourceVersion preconditions. So the
runtime under test decides on versions as stored, exactly as it does in production.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime_fakes import FakeHttp

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.sharding.ownership import Ownership
from jobwatch.core.patch import Fence
from jobwatch.core.refs import ObjectRef
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import Secret
from jobwatch.kube.errors import ApiError

RUNNING = '{"status": "RUNNING"}'
DONE = '{"status": "DONE"}'


@dataclass(frozen=True)
class Deleted:
    """One DELETE the runtime sent: its preconditions, when, and what it got."""

    name: str
    uid: str
    resource_version: str
    at: float  # wall clock
    answer: str  # deleted, gone, conflict, or the fault raised


@dataclass
class StoredApi:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: list[Deleted] = field(default_factory=list)
    # Each DELETE takes the next of these, if any, and raises it instead of deleting.
    delete_faults: list[Exception] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    status_writes: list[tuple[str, float]] = field(default_factory=list)
    reads: int = 0
    # Each version stored: resourceVersion -> the status it held.
    history: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The last end stored of each name (kept after a deletion): its status.
    ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    echo: Callable[[str, dict[str, Any]], None] | None = None  # the runtime's observe
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(100))
    _uids: itertools.count[int] = field(default_factory=itertools.count)

    # --- what a user (the test) does -----------------------------------------------------

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        """A new JobWatch; its ADDED event goes to the runtime."""
        body = {
            "metadata": {"namespace": "ns", "name": name, "uid": f"uid-{next(self._uids)}"},
            "spec": {
                "url": f"http://jobs.test/{name}",
                "successWhen": 'response.body.status == "DONE"',
                "interval": "100ms",
                "timeout": "1m",
                **spec,
            },
            # What the CRD defaults a new object's status to.
            "status": {"observedGeneration": 0},
        }
        body["metadata"]["generation"] = 1
        return self._store(name, body, "ADDED")

    def edit(self, name: str, **spec: Any) -> dict[str, Any]:
        """A spec edit (a new generation); a None value removes the field."""
        body = self.objects[name]
        for key, value in spec.items():
            if value is None:
                body["spec"].pop(key, None)
            else:
                body["spec"][key] = value
        body["metadata"]["generation"] += 1
        return self._store(name, body, "MODIFIED")

    def touch(self, name: str) -> dict[str, Any]:
        """A change the runtime is not told about (a label, say, whose event is still
        on its way): only the resourceVersion moves."""
        return self._store(name, self.objects[name], None)

    def replace(self, name: str, **spec: Any) -> None:
        """Deleted and created again with the same name (a new uid) while the runtime
        looked away: neither event has reached it yet."""
        echo, self.echo = self.echo, None
        try:
            del self.objects[name]
            self.create(name, **spec)
        finally:
            self.echo = echo

    def _store(self, name: str, body: dict[str, Any], event: str | None) -> dict[str, Any]:
        version = str(next(self._versions))
        body["metadata"]["resourceVersion"] = version
        self.history[version] = copy.deepcopy(body.get("status") or {})
        self.objects[name] = body
        if event is not None:
            self._send(event, body)
        return copy.deepcopy(body)

    def _send(self, event: str, body: dict[str, Any]) -> None:
        if self.echo is not None:
            # As a watch event: later, not within the request that caused it.
            asyncio.get_running_loop().call_soon(self.echo, event, copy.deepcopy(body))

    def version(self, name: str) -> str:
        return str(self.objects[name]["metadata"]["resourceVersion"])

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.objects[name].get("status") or {})

    # --- what the runtime calls ----------------------------------------------------------

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        body = self.objects.get(ref.name)
        if body is None or body["metadata"]["uid"] != ref.uid:
            raise ApiError(404, "not found")
        # As JSON: the None values of a rendered status are absent fields.
        body["status"] = json.loads(json.dumps({k: v for k, v in status.items() if v is not None}))
        self.status_writes.append((ref.name, time.time()))
        if body["status"].get("phase") in ("Succeeded", "Failed", "TimedOut"):
            self.ends[ref.name] = copy.deepcopy(body["status"])
        self._store(ref.name, body, "MODIFIED")

    async def create_event(self, ref: ObjectRef, **event: Any) -> None:
        self.events.append({"name": ref.name, **event})

    async def read_jobwatch(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        body = self.objects.get(name)
        return copy.deepcopy(body) if body is not None else None

    async def get_jobwatch(self, ref: ObjectRef) -> dict[str, Any] | None:
        body = await self.read_jobwatch(ref.namespace, ref.name)
        return body if body is not None and body["metadata"]["uid"] == ref.uid else None

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        return None

    async def delete_jobwatch(self, ref: ObjectRef, resource_version: str) -> bool:
        def record(answer: str) -> None:
            self.deletes.append(Deleted(ref.name, ref.uid, resource_version, time.time(), answer))

        if self.delete_faults:
            fault = self.delete_faults.pop(0)
            record(repr(fault))
            raise fault
        body = self.objects.get(ref.name)
        if body is None:
            record("gone")
            return False
        meta = body["metadata"]
        # kube-apiserver 1.35's words (tests/e2e/test_ttl.py checks them).
        cannot = f'Operation cannot be fulfilled on JobWatch.jobwatch.dev "{ref.name}": '
        if meta["uid"] != ref.uid:
            record("conflict")
            raise ApiError(
                409,
                f"{cannot}the UID in the precondition ({ref.uid}) does not match the UID in "
                f"record ({meta['uid']}). The object might have been deleted and then recreated",
            )
        if meta["resourceVersion"] != resource_version:
            record("conflict")
            raise ApiError(
                409,
                f"{cannot}the ResourceVersion in the precondition ({resource_version}) does not "
                f"match the ResourceVersion in record ({meta['resourceVersion']}). The object "
                "might have been modified",
            )
        del self.objects[ref.name]
        record("deleted")
        self._send("DELETED", body)
        return True

    # --- what the tests read -------------------------------------------------------------

    def deleted(self, name: str) -> list[Deleted]:
        return [d for d in self.deletes if d.name == name and d.answer == "deleted"]

    def warnings(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("warning") and e.get("reason") == reason]


def config(**env: str) -> Config:
    return Config.from_env({"JOBWATCH_STATUS_QPS": "1000", "JOBWATCH_STATUS_BURST": "1000", **env})


class Env:
    """A running runtime (a single replica unless `ownership`) on a StoredApi."""

    def __init__(self, *, ownership: Ownership | None = None, **env: str) -> None:
        self.api, self.http, self.metrics = StoredApi(), FakeHttp(), Metrics()
        self.runtime = Runtime(
            config(**env),
            self.api,  # type: ignore[arg-type]
            self.http,  # type: ignore[arg-type]
            self.metrics,
            ownership=ownership,
        )
        self.api.echo = self.runtime.observe

    def deletions(self, outcome: str) -> float:
        sample = self.metrics.registry.get_sample_value(
            "jobwatch_ttl_deletions_total", {"outcome": outcome}
        )
        return sample or 0.0

    async def __aenter__(self) -> Env:
        self.runtime.start()
        self.runtime.start_polling()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.runtime.shutdown(1.0)
