"""Lifecycle (API.md): restarts, spec changes, suspend, deletion, shutdown, status writes."""

from __future__ import annotations

import time
import urllib.request

from conftest import OperatorFactory
from harness import JobServer, Namespace, Operator, Reply, condition, free_port, wait_for
from kubernetes import client as k8s

PENDING = Reply(200, {"status": "PROCESSING"})
DONE = Reply(200, {"status": "COMPLETED"})
RULES = {"successWhen": 'response.body.status == "COMPLETED"'}


def stays(probe: object, seconds: float) -> None:
    """Asserts that `probe()` stays true for `seconds` (for 'nothing more happens' checks)."""
    assert callable(probe)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert probe(), "the condition stopped holding"
        time.sleep(0.05)


def test_restart_resumes_deadline_and_attempts(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    first = start_operator()
    url = jobs.script("/long", [PENDING])
    ns.create("long", {"url": url, "interval": "200ms", "timeout": "5m", **RULES})
    before = ns.wait_status("long", lambda s: s.get("attempts", 0) >= 3, 15, "3 attempts")
    took = first.stop()
    assert took < 10, f"shutdown took {took:.1f}s"
    stopped = ns.status("long")
    assert stopped["phase"] == "Polling", "a watch interrupted by shutdown stays Polling"
    sent = len(jobs.seen("/long"))
    assert stopped["attempts"] == sent, "shutdown flushes the attempt count"

    start_operator()
    after = ns.wait_status(
        "long", lambda s: s.get("attempts", 0) >= sent + 2, 15, "attempts carried on"
    )
    assert after["startTime"] == before["startTime"]
    assert after["deadline"] == before["deadline"]
    jobs.script("/long", [DONE])
    done = ns.wait_phase("long", "Succeeded")
    assert done["attempts"] == len(jobs.seen("/long"))


def test_restart_after_a_crash_keeps_the_deadline(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    first = start_operator()
    url = jobs.script("/crash", [PENDING])
    ns.create("crash", {"url": url, "interval": "200ms", "timeout": "4s", **RULES})
    before = ns.wait_status("crash", lambda s: s.get("attempts", 0) >= 2, 10, "2 attempts")
    first.kill()
    start_operator()
    status = ns.wait_phase("crash", "TimedOut", timeout=15)
    assert status["startTime"] == before["startTime"]
    assert status["deadline"] == before["deadline"]


def test_spec_change_starts_a_new_watch_even_after_the_end(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/v1", [DONE])
    ns.create("rerun", {"url": url, **RULES})
    first = ns.wait_phase("rerun", "Succeeded")
    assert first["attempts"] == 1
    url2 = jobs.script("/v2", [PENDING, PENDING, DONE])
    ns.patch_spec("rerun", {"url": url2, "interval": "100ms"})
    second = ns.wait_status(
        "rerun",
        lambda s: s.get("observedGeneration") == 2 and s.get("phase") == "Succeeded",
        15,
        "the second watch to succeed",
    )
    assert second["attempts"] == 3
    assert second["startTime"] > first["startTime"]
    assert condition(second, "Finished")["observedGeneration"] == 2


def test_suspend_pauses_the_same_watch_and_resume_carries_on(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/paused", [PENDING])
    ns.create("paused", {"url": url, "interval": "100ms", **RULES})
    before = ns.wait_status("paused", lambda s: s.get("attempts", 0) >= 3, 10, "3 attempts")
    ns.patch_spec("paused", {"suspend": True})
    suspended = ns.wait_status(
        "paused", lambda s: s.get("observedGeneration") == 2, 10, "the suspend to be seen"
    )
    assert suspended["phase"] == "Polling"
    assert condition(suspended, "Reconciling")["reason"] == "Suspended"
    time.sleep(0.3)  # a request already in flight may still land
    count = len(jobs.seen("/paused"))
    stays(lambda: len(jobs.seen("/paused")) == count, 1.0)

    ns.patch_spec("paused", {"suspend": False})
    resumed = ns.wait_status(
        "paused", lambda s: s.get("attempts", 0) > suspended["attempts"] + 2, 10, "polling again"
    )
    assert resumed["startTime"] == before["startTime"]
    assert resumed["observedGeneration"] == 3


def test_deleting_stops_polling_within_one_interval(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/deleted", [PENDING])
    ns.create("deleted", {"url": url, "interval": "200ms", **RULES})
    wait_for(lambda: len(jobs.seen("/deleted")) >= 2, 10, "polling")
    ns.delete("deleted")
    wait_for(lambda: ns.get("deleted") is None, 5, "the object to be gone")
    time.sleep(0.3)  # one interval, plus a request that was already in flight
    count = len(jobs.seen("/deleted"))
    stays(lambda: len(jobs.seen("/deleted")) == count, 1.0)


def test_deletion_and_namespace_deletion_never_hang_without_the_operator(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    op = start_operator()
    url = jobs.script("/orphan", [PENDING])
    ns.create("orphan", {"url": url, "interval": "200ms", **RULES})
    ns.create("orphan-2", {"url": url, "interval": "200ms", **RULES})
    ns.wait_phase("orphan", "Polling")
    op.stop()
    assert not (ns.get("orphan") or {}).get("metadata", {}).get("finalizers")
    ns.delete("orphan")
    wait_for(lambda: ns.get("orphan") is None, 5, "the JobWatch to be deleted")
    # The namespace (with a JobWatch still in it) terminates, too.
    ns.cluster.core.delete_namespace(ns.name)

    def namespace_gone() -> bool:
        try:
            ns.cluster.core.read_namespace(ns.name)
        except k8s.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(namespace_gone, 60, "the namespace to finish terminating", interval=0.5)


def test_sigterm_flushes_status_and_exits_promptly(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    # A long progress interval: only the shutdown flush can publish the attempts.
    op = start_operator(JOBWATCH_STATUS_PROGRESS_INTERVAL="1h")
    url = jobs.script("/flush", [PENDING])
    ns.create("flush", {"url": url, "interval": "100ms", **RULES})
    wait_for(lambda: len(jobs.seen("/flush")) >= 5, 10, "several polls")
    took = op.stop()
    assert took < 10
    status = ns.status("flush")
    assert status["phase"] == "Polling"
    assert status["attempts"] == len(jobs.seen("/flush"))


def metric(op: Operator, name: str) -> float:
    port = op.env.get("JOBWATCH_METRICS_PORT")
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_progress_of_a_pending_watch_is_written_at_most_once_per_interval(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    port = str(free_port())
    op = start_operator(JOBWATCH_STATUS_PROGRESS_INTERVAL="2s", JOBWATCH_METRICS_PORT=port)
    url = jobs.script("/chatty", [PENDING])
    ns.create("chatty", {"url": url, "interval": "100ms", **RULES})
    wait_for(lambda: len(jobs.seen("/chatty")) >= 40, 15, "40 polls")
    polls = len(jobs.seen("/chatty"))
    writes = metric(op, 'jobwatch_status_writes_total{result="written"}')
    # Pending → Polling is one urgent write; the rest is progress every 2s.
    assert writes <= 2 + polls * 0.1 / 2 + 1, (writes, polls)
    assert writes >= 2


def test_printer_columns(ns: Namespace, jobs: JobServer, operator: Operator) -> None:
    url = jobs.script("/cols", [DONE])
    ns.create("cols", {"url": url})
    ns.wait_phase("cols", "Succeeded")
    table = ns.cluster.kubectl("get", "jw", "-n", ns.name)
    header = table.stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "ATTEMPTS", "REASON", "AGE"]
    row = table.stdout.splitlines()[1].split()
    assert row[:4] == ["cols", "Succeeded", "1", "SuccessConditionMet"]
    wide = ns.cluster.kubectl("get", "jw", "-n", ns.name, "-o", "wide")
    assert "URL" in wide.stdout.splitlines()[0]
    assert url in wide.stdout


def test_label_selector_shards_the_watches(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    start_operator(JOBWATCH_LABEL_SELECTOR="jobwatch.dev/shard=a")
    url = jobs.script("/sharded", [DONE])
    ns.create("mine", {"url": url}, labels={"jobwatch.dev/shard": "a"})
    ns.create("theirs", {"url": url}, labels={"jobwatch.dev/shard": "b"})
    ns.wait_phase("mine", "Succeeded")
    # Only the CRD's default (observedGeneration 0): no operator wrote to it.
    stays(lambda: ns.status("theirs") == {"observedGeneration": 0}, 1.0)
    assert len(jobs.seen("/sharded")) == 1


def test_a_suspended_watch_still_times_out_at_its_deadline(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/asleep", [PENDING])
    ns.create("asleep", {"url": url, "suspend": True, "timeout": "2s", "interval": "100ms"})
    suspended = ns.wait_status(
        "asleep",
        lambda s: condition(s, "Reconciling").get("reason") == "Suspended",
        10,
        "the suspension to show",
    )
    assert suspended["phase"] == "Pending"
    status = ns.wait_phase("asleep", "TimedOut")
    assert status["reason"] == "DeadlineExceeded"
    assert jobs.seen("/asleep") == []
