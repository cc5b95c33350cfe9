"""spec.ttlSecondsAfterFinished on the real API server (issue #23): a finished JobWatch is
deleted that many seconds after status.completionTime, by the operator, across restarts.

Every figure is measured from the stored `status.completionTime` to the moment a watch of
our own on the API server sees the object DELETED (`Sightings`), and printed (run with
`-s`, or read the test log). The bound is the TTL plus one `interval` of the watch.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
from conftest import OPERATOR_NAMESPACE, OperatorFactory
from harness import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    JobServer,
    Namespace,
    Operator,
    Reply,
    free_port,
    wait_for,
)
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from jobwatch.control.sharding.leases import bucket_of
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import parse_time
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError

pytestmark = pytest.mark.e2e

PENDING = Reply(200, {"status": "PROCESSING"})
DONE = Reply(200, {"status": "COMPLETED"})
INTERVAL = 0.5  # seconds: each watch's spec.interval, the slack the issue allows
RULES = {"successWhen": 'response.body.status == "COMPLETED"', "interval": "500ms"}


@dataclass
class Sightings:
    """A watch of the namespace's JobWatches on the API server, in a thread of its own:
    each object's last version seen and when it was seen DELETED (wall clock)."""

    cluster: Cluster
    namespace: str
    gone: dict[str, float] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._api = k8s_config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        custom = k8s.CustomObjectsApi(self._api)
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        self._version = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, args=(custom,), daemon=True)
        self._thread.start()

    def _run(self, custom: k8s.CustomObjectsApi) -> None:
        while not self._stop.is_set():
            stream = k8s_watch.Watch().stream(
                custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                resource_version=self._version,
                timeout_seconds=2,
            )
            for event in stream:
                at = time.time()
                obj = event["object"]
                meta = obj.get("metadata") or {}
                self._version = meta.get("resourceVersion", self._version)
                with self._lock:
                    self.last[meta["name"]] = obj
                    if event["type"] == "DELETED":
                        self.gone[meta["name"]] = at

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._api.close()

    def completion(self, name: str) -> float:
        """The stored completionTime of the object's last version seen."""
        with self._lock:
            status = self.last[name].get("status") or {}
        at = parse_time(status.get("completionTime"))
        assert at is not None, status
        return at

    def gone_at(self, name: str, timeout: float) -> float:
        wait_for(lambda: name in self.gone, timeout, f"{name} to be seen deleted", 0.02)
        return self.gone[name]


@pytest.fixture
def sightings(ns: Namespace) -> Iterator[Sightings]:
    seen = Sightings(ns.cluster, ns.name)
    yield seen
    seen.close()


def report(case: str, seconds: float, bound: float | None = None) -> None:
    limit = f" (bound {bound:.3f} s)" if bound is not None else ""
    print(f"\nTTL e2e [{case}]: {seconds:.3f} s{limit}")


def deleted_by_the_last_start(operator: Operator, ns: Namespace, name: str) -> bool:
    """The deletion's log line is the operator process started last's (one log file)."""
    last = operator.logs().rsplit("===== operator start", 1)[-1]
    return f"{ns.name}/{name} deleted: spec.ttlSecondsAfterFinished" in last


def ended(ns: Namespace, name: str, timeout: float = 20) -> dict[str, Any]:
    return ns.wait_status(
        name,
        lambda s: s.get("phase") == "Succeeded" and s.get("observedGeneration") is not None,
        timeout,
        "Succeeded",
    )


def stays(probe: Callable[[], bool], seconds: float, what: str) -> None:
    """`probe()` holds for `seconds` (a "nothing happens" check)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert probe(), what
        time.sleep(0.05)


def test_ttl_2s_is_gone_within_ttl_and_one_interval_and_no_ttl_is_kept(
    ns: Namespace, jobs: JobServer, operator: Operator, sightings: Sightings
) -> None:
    url = jobs.script("/two", [DONE])
    ns.create("ttl-2", {"url": url, "ttlSecondsAfterFinished": 2, **RULES})
    ns.create("no-ttl", {"url": url, **RULES})
    gone = sightings.gone_at("ttl-2", 20)
    took = gone - sightings.completion("ttl-2")
    report("TTL 2 s, completionTime to gone", took, 2 + INTERVAL)
    assert 2.0 <= took <= 2 + INTERVAL
    # The one without a TTL ended as long ago, and stays.
    kept = ended(ns, "no-ttl")
    assert parse_time(kept["completionTime"]) <= sightings.completion("ttl-2") + 1
    stays(lambda: ns.get("no-ttl") is not None, 2.0, "no-ttl was deleted")
    assert "no-ttl" not in sightings.gone
    logs = operator.logs()
    assert f"{ns.name}/ttl-2 deleted: spec.ttlSecondsAfterFinished 2 s" in logs
    assert f"{ns.name}/no-ttl deleted" not in logs


def test_ttl_0_deletes_at_once(
    ns: Namespace, jobs: JobServer, operator: Operator, sightings: Sightings
) -> None:
    url = jobs.script("/zero", [DONE])
    ns.create("ttl-0", {"url": url, "ttlSecondsAfterFinished": 0, **RULES})
    gone = sightings.gone_at("ttl-0", 20)
    took = gone - sightings.completion("ttl-0")
    report("TTL 0, completionTime to gone", took, INTERVAL)
    assert 0.0 <= took <= INTERVAL
    # The end was stored before the object went: the last version seen holds it.
    assert (sightings.last["ttl-0"].get("status") or {}).get("phase") == "Succeeded"


def test_restart_before_the_ttl_ran_out_still_deletes_on_time(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory, sightings: Sightings
) -> None:
    ttl = 8
    first = start_operator()
    url = jobs.script("/restart", [DONE])
    ns.create("restart", {"url": url, "ttlSecondsAfterFinished": ttl, **RULES})
    completion = parse_time(ended(ns, "restart")["completionTime"]) or 0.0
    first.stop()
    second = start_operator()
    restarted = time.time()
    assert restarted < completion + ttl - 2, "the restart came too late to test this"
    gone = sightings.gone_at("restart", ttl + 20)
    took = gone - completion
    report(
        f"TTL {ttl} s, operator stopped and started again {restarted - completion:.1f} s "
        "after the end, completionTime to gone",
        took,
        ttl + INTERVAL,
    )
    assert ttl <= took <= ttl + INTERVAL
    wait_for(lambda: deleted_by_the_last_start(second, ns, "restart"), 5, "the log line")


def test_restart_after_the_ttl_passed_deletes_at_once_on_start(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory, sightings: Sightings
) -> None:
    ttl = 2
    first = start_operator()
    url = jobs.script("/late", [DONE])
    ns.create("late", {"url": url, "ttlSecondsAfterFinished": ttl, **RULES})
    completion = parse_time(ended(ns, "late")["completionTime"]) or 0.0
    first.stop()
    assert time.time() < completion + ttl, "the operator stopped too late to test this"
    # Nobody deletes it while no operator runs, past its time.
    stays(
        lambda: ns.get("late") is not None,
        completion + ttl + 1 - time.time(),
        "deleted with no operator running",
    )
    second = start_operator()
    started = time.time()
    gone = sightings.gone_at("late", 30)
    report("TTL 2 s passed while stopped: operator start to gone", gone - started, 10)
    report("TTL 2 s passed while stopped: completionTime to gone", gone - completion)
    # At once on start: as soon as the operator has listed its namespace (its start-up,
    # a second or two, is all of it).
    assert gone - started <= 10
    wait_for(lambda: deleted_by_the_last_start(second, ns, "late"), 5, "the log line")


def test_a_spec_edit_after_the_end_cancels_and_the_clock_restarts_on_the_new_end(
    ns: Namespace, jobs: JobServer, operator: Operator, sightings: Sightings
) -> None:
    ttl = 3
    ns.create(
        "rerun", {"url": jobs.script("/first", [DONE]), "ttlSecondsAfterFinished": ttl, **RULES}
    )
    first = parse_time(ended(ns, "rerun")["completionTime"]) or 0.0
    ns.patch_spec("rerun", {"url": jobs.script("/second", [PENDING])})
    ns.wait_status(
        "rerun",
        lambda s: s.get("observedGeneration") == 2 and s.get("phase") == "Polling",
        10,
        "the watch to run again",
    )
    # Past the first end's deletion time, plus an interval: it runs on.
    stays(
        lambda: (ns.status("rerun") or {}).get("phase") == "Polling",
        first + ttl + INTERVAL + 0.5 - time.time(),
        "the re-run watch was deleted or ended",
    )
    assert "rerun" not in sightings.gone
    jobs.script("/second", [DONE])
    gone = sightings.gone_at("rerun", 30)
    second = sightings.completion("rerun")
    assert second > first + ttl
    took = gone - second
    report("TTL 3 s after a re-run, new completionTime to gone", took, ttl + INTERVAL)
    assert ttl <= took <= ttl + INTERVAL


def test_a_ttl_only_edit_does_not_rerun_and_counts_from_the_same_end(
    ns: Namespace, jobs: JobServer, operator: Operator, sightings: Sightings
) -> None:
    url = jobs.script("/edit", [DONE])
    ns.create("edit", {"url": url, "ttlSecondsAfterFinished": 3600, **RULES})
    before = ended(ns, "edit")
    completion = parse_time(before["completionTime"]) or 0.0
    ns.patch_spec("edit", {"ttlSecondsAfterFinished": 4})
    acked = ns.wait_status(
        "edit", lambda s: s.get("observedGeneration") == 2, 10, "the edit to be acknowledged"
    )
    for kept in ("phase", "startTime", "completionTime", "attempts", "specHash"):
        assert acked[kept] == before[kept], kept
    gone = sightings.gone_at("edit", 20)
    took = gone - completion
    report("TTL 3600 s edited to 4 s after the end, completionTime to gone", took, 4 + INTERVAL)
    assert 4 <= took <= 4 + INTERVAL
    assert len(jobs.seen("/edit")) == 1  # never polled again


def test_removing_the_ttl_keeps_the_watch(
    ns: Namespace, jobs: JobServer, operator: Operator, sightings: Sightings
) -> None:
    ns.create("keep", {"url": jobs.script("/keep", [DONE]), "ttlSecondsAfterFinished": 3, **RULES})
    completion = parse_time(ended(ns, "keep")["completionTime"]) or 0.0
    ns.cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns.name, PLURAL, "keep", {"spec": {"ttlSecondsAfterFinished": None}}
    )
    ns.wait_status("keep", lambda s: s.get("observedGeneration") == 2, 10, "the edit")
    stays(
        lambda: ns.get("keep") is not None,
        completion + 3 + INTERVAL + 0.5 - time.time(),
        "deleted after its TTL was removed",
    )
    assert ns.status("keep")["phase"] == "Succeeded"


def test_printer_columns_show_completion_and_ttl(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/cols", [DONE])
    ns.create("cols", {"url": url, "ttlSecondsAfterFinished": 3600, **RULES})
    ended(ns, "cols")
    table = ns.cluster.kubectl("get", "jw", "-n", ns.name)
    assert table.stdout.splitlines()[0].split() == ["NAME", "PHASE", "ATTEMPTS", "REASON", "AGE"]
    wide = ns.cluster.kubectl("get", "jw", "-n", ns.name, "-o", "wide").stdout.splitlines()
    header, row = wide[0].split(), wide[1].split()
    assert header == [
        "NAME", "PHASE", "ATTEMPTS", "REASON", "AGE", "COMPLETED", "TTL", "URL",
    ]  # fmt: skip
    assert row[header.index("TTL")] == "3600"
    assert row[header.index("COMPLETED")].endswith("s")  # seconds ago
    assert row[-1] == url


# --- replicas: each JobWatch deleted once, by its bucket's holder ------------------------


def metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def buckets_held(port: int) -> set[int]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return set()
    return {int(b) for b in re.findall(r'^jobwatch_bucket_held\{bucket="(\d+)"\} 1', text, re.M)}


def test_replicas_each_delete_what_they_own_once(
    ns: Namespace,
    jobs: JobServer,
    operator_kubeconfig: Path,
    test_logs: Path,
    sightings: Sightings,
) -> None:
    group, buckets, watches = f"ttl-{uuid.uuid4().hex[:8]}", 8, 16
    replicas: list[tuple[Operator, int]] = []
    for name in ("r1", "r2"):
        port = free_port()
        env = {
            "JOBWATCH_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
            "JOBWATCH_LEASE_GROUP": group,
            "JOBWATCH_IDENTITY": name,
            "JOBWATCH_BUCKETS": str(buckets),
            "JOBWATCH_LEASE_DURATION": "4s",
            "JOBWATCH_LEASE_RENEW_DEADLINE": "3s",
            "JOBWATCH_LEASE_RETRY_PERIOD": "0.5s",
            "JOBWATCH_METRICS_PORT": str(port),
        }
        log = test_logs / f"{name}.log"
        replicas.append((Operator(operator_kubeconfig, ns.name, log, env).start(), port))
    try:
        wait_for(
            lambda: [len(buckets_held(port)) for _, port in replicas] == [buckets // 2] * 2,
            60,
            "the replicas sharing the buckets",
        )
        held = [buckets_held(port) for _, port in replicas]
        url = jobs.script("/fleet", [DONE])
        names = [f"w{n}" for n in range(watches)]
        for name in names:
            ns.create(name, {"url": url, "ttlSecondsAfterFinished": 2, **RULES})
        took = [sightings.gone_at(name, 30) - sightings.completion(name) for name in names]
        report(
            f"TTL 2 s, 2 replicas, {watches} watches: the slowest, completionTime to gone",
            max(took),
            2 + INTERVAL,
        )
        assert all(2 <= t <= 2 + INTERVAL for t in took), took
        outcomes = {
            outcome: sum(
                metric(port, "jobwatch_ttl_deletions_total", f'outcome="{outcome}"')
                for _, port in replicas
            )
            for outcome in ("deleted", "gone", "conflict", "failed")
        }
        # Each deleted once, by one replica: no second attempt anywhere.
        assert outcomes == {"deleted": watches, "gone": 0, "conflict": 0, "failed": 0}
        # And that replica is the holder of its bucket.
        for (_, port), theirs in zip(replicas, held, strict=True):
            owned = sum(bucket_of(ns.name, name, buckets) in theirs for name in names)
            assert metric(port, "jobwatch_ttl_deletions_total", 'outcome="deleted"') == owned
    finally:
        for operator, _ in replicas:
            operator.stop()


# --- the DELETE's preconditions, as the API server applies them -------------------------


@pytest.fixture
async def api(operator_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeApi]:
    """The operator's API client, with the operator's own ServiceAccount token (its RBAC)."""
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    settings = kopf.OperatorSettings()

    def credentials() -> kopf.ConnectionInfo:
        info = kopf.login_with_kubeconfig(settings=settings)
        assert info is not None
        return info

    client = KubeApi(credentials)
    yield client
    await client.aclose()


def stored(ns: Namespace, name: str) -> tuple[str, str]:
    meta = (ns.get(name) or {})["metadata"]
    return meta["uid"], meta["resourceVersion"]


async def test_the_delete_removes_only_the_version_decided_on(ns: Namespace, api: KubeApi) -> None:
    spec = {"url": "http://jobs.invalid/x", "ttlSecondsAfterFinished": 0}
    ns.create("w", spec)
    uid, version = stored(ns, "w")
    # An edit since the decision (a label here): refused, the object stays.
    ns.cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns.name, PLURAL, "w", {"metadata": {"labels": {"x": "1"}}}
    )
    with pytest.raises(ApiError) as refused:
        await api.delete_jobwatch(ObjectRef(ns.name, "w", uid), version)
    assert refused.value.status == 409
    assert "ResourceVersion in the precondition" in refused.value.message
    assert ns.get("w") is not None
    # A namesake: deleted and created again with the same name. The old uid deletes nothing.
    ns.delete("w")
    wait_for(lambda: ns.get("w") is None, 10, "w to be deleted")
    ns.create("w", spec)
    new_uid, new_version = stored(ns, "w")
    with pytest.raises(ApiError) as namesake:
        await api.delete_jobwatch(ObjectRef(ns.name, "w", uid), new_version)
    assert namesake.value.status == 409
    assert "UID in the precondition" in namesake.value.message, namesake.value.message
    assert stored(ns, "w")[0] == new_uid
    # The version decided on: deleted (the operator's ServiceAccount may); then nothing left.
    assert await api.delete_jobwatch(ObjectRef(ns.name, "w", new_uid), new_version) is True
    wait_for(lambda: ns.get("w") is None, 10, "w to be deleted")
    assert await api.delete_jobwatch(ObjectRef(ns.name, "w", new_uid), new_version) is False
