"""Status writes fenced by `status.holder` on the real API server (issue #20).

A replica that wakes from a freeze after its Lease ran out still has writes queued. Each
write tests, after the uid, that the object's status still holds the holder and phase
its writer last knew; the API server refuses it otherwise, and the writer reads the
object once: an end the new holder wrote stands, anything else is written over, whole.

These tests drive two StatusWriters with different identities, each with its own API
client holding only the operator's ServiceAccount token (its real RBAC), on one real
JobWatch: no operator process runs.

What kube-apiserver answers (measured on 1.35 with this CRD), which kube/api.py relies on:
- a failed `test` refuses the whole patch with 422, reason Invalid, no details, and the
  generic message kube.errors.PATCH_NOT_APPLIED (the same as a failed uid test); a refusal by
  the schema is 422 too, but names the object and the fields;
- a `test` with value null passes on a field that is absent when its parent exists;
- the CRD defaults `status` to {observedGeneration: 0}, so the patch always sees a
  status: a `test` of /status against null is refused even on an object never written.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
from harness import GROUP, PLURAL, VERSION, Namespace, condition

from jobwatch.control.status import writer as status_module
from jobwatch.control.status.writer import StatusWriter
from jobwatch.core.patch import Fence
from jobwatch.core.policy import Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import PATCH_NOT_APPLIED, ApiError

pytestmark = pytest.mark.e2e

SPEC = {"url": "http://jobs.invalid/job", "interval": "1m", "timeout": "10m"}
# A write refused by its fence is written again after the retry delay.
FLUSH = status_module.RETRY_DELAY + 5


@pytest.fixture
async def api(
    operator_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], KubeApi]]:
    """Makes API clients that log in as the operator's ServiceAccount."""
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    settings = kopf.OperatorSettings()
    made: list[KubeApi] = []

    def credentials() -> kopf.ConnectionInfo:
        info = kopf.login_with_kubeconfig(settings=settings)
        assert info is not None
        return info

    def make() -> KubeApi:
        made.append(KubeApi(credentials))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@dataclass
class Replica:
    """What of an operator replica writes status: its API client and status writer."""

    api: KubeApi
    writer: StatusWriter
    metrics: Metrics

    def writes(self, result: str) -> float:
        labels = {"result": result}
        return self.metrics.registry.get_sample_value("jobwatch_status_writes_total", labels) or 0.0


def replica(
    api: KubeApi, identity: str, ended: Callable[[dict[str, Any]], None] = lambda body: None
) -> Replica:
    metrics = Metrics()
    out = StatusWriter(
        api,
        metrics,
        qps=100,
        burst=100,
        event_qps=1,
        event_burst=1,
        progress_interval=60,
        wall=time.time,
        clock=time.monotonic,
        identity=identity,
        on_foreign_end=ended,
    )
    return Replica(api, out, metrics)


def taken_in(ns: Namespace, name: str, by: Replica) -> Watch:
    """The JobWatch as a replica takes it in: its Watch, its stored status to the writer."""
    body = ns.get(name)
    assert body is not None
    meta = body["metadata"]
    ref = ObjectRef(ns.name, name, meta["uid"])
    by.writer.stored(ref, body.get("status"))
    now = time.time()
    return Watch(
        ref=ref,
        generation=int(meta["generation"]),
        spec_hash="h",
        spec=None,
        compiled=None,
        suspended=False,
        start_time=now,
        deadline=now + 600,
        phase=Phase.POLLING,
    )


async def written(by: Replica, watch: Watch) -> None:
    by.writer.submit(watch, urgent=True)
    await by.writer.flush(FLUSH)


@pytest.mark.parametrize("wrote_before", [False, True], ids=["first-write", "progress"])
async def test_a_stale_replica_cannot_undo_the_end_its_successor_wrote(
    ns: Namespace, api: Callable[[], KubeApi], wrote_before: bool
) -> None:
    """The stale replica's queued write is its first (the whole status, Polling: what
    issue #20 saw land over Succeeded), or progress after a write of its own (a field
    patch of `attempts`)."""
    ns.create("w", SPEC)
    ended: list[dict[str, Any]] = []
    stale = replica(api(), "replica-a", ended.append)
    old = taken_in(ns, "w", stale)
    if wrote_before:
        await written(stale, old)
        assert (ns.status("w")["holder"], ns.status("w")["phase"]) == ("replica-a", "Polling")

    # The bucket's next holder takes the object in and ends it.
    successor = replica(api(), "replica-b")
    new = taken_in(ns, "w", successor)
    new.phase, new.reason, new.completion_time = Phase.SUCCEEDED, "SuccessConditionMet", 1e9
    await written(successor, new)
    done = ns.status("w")
    assert (done["holder"], done["phase"]) == ("replica-b", "Succeeded")

    # The stale replica wakes with a write queued, its fence from before the end.
    with pytest.raises(ApiError) as refused:
        await stale.api.patch_status(old.ref, {"phase": "Polling"}, Fence.of({"phase": None}))
    assert (refused.value.status, refused.value.message) == (422, PATCH_NOT_APPLIED)
    assert refused.value.not_applied
    old.attempts = 7
    await written(stale, old)
    after = ns.status("w")
    assert after == done  # nothing of it landed: still Succeeded, Finished, the same end
    assert condition(after, "Finished")["status"] == "True"
    # It read the object once and handed the end to its runtime instead of writing.
    assert [body["status"]["phase"] for body in ended] == ["Succeeded"]
    assert (stale.writes("refused"), stale.writes("repaired")) == (1, 0)


async def test_a_foreign_status_that_is_no_end_is_written_over_whole(
    ns: Namespace, api: Callable[[], KubeApi]
) -> None:
    ns.create("w", SPEC)
    first = replica(api(), "replica-a")
    watch = taken_in(ns, "w", first)
    await written(first, watch)
    other = replica(api(), "replica-b")
    theirs = taken_in(ns, "w", other)
    theirs.attempts = 3
    await written(other, theirs)
    watch.attempts = 5
    await written(first, watch)
    now = ns.status("w")
    assert (now["holder"], now["phase"], now["attempts"]) == ("replica-a", "Polling", 5)
    assert (first.writes("refused"), first.writes("repaired")) == (1, 1)


async def test_statuses_written_before_the_fence_are_written_over(
    ns: Namespace, api: Callable[[], KubeApi]
) -> None:
    """An object never written (the CRD's default status) and one whose status predates
    `status.holder` both take a fenced write."""
    out = replica(api(), "replica-a")
    ns.create("fresh", SPEC)
    ns.create("old", SPEC)
    assert ns.status("fresh") == {"observedGeneration": 0}
    predates = {"phase": "Polling", "reason": "Polling", "attempts": 2, "observedGeneration": 1}
    ns.cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns.name, PLURAL, "old", {"status": predates}
    )
    fresh, old = taken_in(ns, "fresh", out), taken_in(ns, "old", out)
    # What a truly absent status would be tested with: on this CRD there is always one.
    with pytest.raises(ApiError) as refused:
        await out.api.patch_status(fresh.ref, {"phase": "Pending"}, Fence.of(None))
    assert refused.value.not_applied
    for watch in (fresh, old):
        await written(out, watch)
    for name in ("fresh", "old"):
        assert (ns.status(name)["holder"], ns.status(name)["phase"]) == ("replica-a", "Polling")
    assert out.writes("refused") == 0
