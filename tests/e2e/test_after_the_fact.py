"""What a user reads after the fact (#24), on the real API server: an end keeps why the
watch never finished, a suspended watch says so, and a burst of phase changes leaves a
few Events whose counts add up instead of thousands dropped."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import OperatorFactory
from harness import (
    GROUP,
    PLURAL,
    VERSION,
    JobServer,
    Namespace,
    Operator,
    Reply,
    condition,
    free_port,
    wait_for,
)
from test_lifecycle import metric

from jobwatch.core.durations import parse_duration

RULES = {
    "successWhen": 'response.body.status == "COMPLETED"',
    "failureWhen": 'response.body.status == "FAILED"',
}
PENDING = Reply(200, {"status": "PROCESSING"})


def reason_column(ns: Namespace, name: str) -> str:
    """REASON as `kubectl get jw` prints it (NAME PHASE ATTEMPTS REASON AGE)."""
    got = ns.cluster.kubectl("get", "jw", name, "-n", ns.name, "--no-headers")
    assert got.returncode == 0, got.stderr
    return got.stdout.split()[3]


# What the endpoint answers every time, the class of the error, and what its message says.
BROKEN = {
    "nan-body": (
        Reply(200, '{"status": "COMPLETED", "score": NaN}'),
        "InvalidResponse",
        re.compile(r'NaN is not valid JSON.*body: \{"status": "COMPLETED", "score": NaN\}'),
    ),
    "http-500": (
        Reply(500, {"error": "boom"}),
        "Transient",
        re.compile(r"^HTTP 500 from the endpoint$"),
    ),
}


# The end's message when the deadline cut the last request short (`after`: what it had).
CUT_SHORT = re.compile(
    r"deadline passed after \d+ attempts?, cutting (it|the last one) short after (?P<after>\S+);"
)


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_a_deadline_keeps_the_last_error_of_an_endpoint_that_never_answered_well(
    ns: Namespace, jobs: JobServer, operator: Operator, case: tuple[Reply, str, re.Pattern[str]]
) -> None:
    reply, error_class, error = case
    url = jobs.script("/broken", [reply])
    ns.create("broken", {"url": url, "interval": "200ms", "timeout": "3s", **RULES})
    status = ns.wait_phase("broken", "TimedOut", timeout=15)
    assert status["reason"] == "DeadlineExceeded"
    last_error = status["lastError"]
    assert last_error["class"] == error_class
    assert error.search(last_error["message"]), last_error
    assert status["lastResponse"]["code"] == reply.code
    attempts = status["attempts"]
    seen = len(jobs.seen("/broken"))
    streak = f"{error_class}: {last_error['message']}"
    # A poll sent just before the deadline may be cut short by it, under load (CI); that
    # one is an attempt, not an error, and the message speaks of the ones before it.
    cut = CUT_SHORT.match(status["message"])
    if cut is None:
        assert attempts == seen >= 2
        assert status["consecutiveErrors"] == attempts  # every one of them failed
        assert status["message"] == (
            f"deadline passed after {attempts} attempts; the last {attempts} failed, "
            f"the last one: {streak}"
        )
    else:
        assert attempts - 1 <= seen <= attempts  # it may not have reached the service
        assert attempts - 1 == status["consecutiveErrors"] >= 2
        assert status["message"] == (
            f"deadline passed after {attempts} attempts, cutting the last one short after "
            f"{cut['after']}; the {attempts - 1} before it failed, the last one: {streak}"
        )
    assert condition(status, "Stalled")["message"] == status["message"]
    timed_out = wait_for(
        lambda: [e for e in ns.events("broken") if e.reason == "DeadlineExceeded"],
        10,
        "the DeadlineExceeded Event",
    )
    assert [(e.type, e.message) for e in timed_out] == [("Warning", status["message"])]


def test_a_request_the_deadline_cuts_short_is_not_the_last_error(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    operator = start_operator(JOBWATCH_METRICS_PORT=str(free_port()))
    nan, error_class, error = BROKEN["nan-body"]
    # A broken answer, then an answer that takes longer than the deadline leaves.
    url = jobs.script("/slow", [nan, Reply(200, {"status": "COMPLETED"}, delay=30)])
    ns.create("slow", {"url": url, "interval": "200ms", "timeout": "3s", **RULES})
    status = ns.wait_phase("slow", "TimedOut", timeout=15)
    assert status["reason"] == "DeadlineExceeded"
    assert status["attempts"] == 2
    # The cut request is no error of the endpoint's: the end names the answer before it.
    assert status["consecutiveErrors"] == 1
    last_error = status["lastError"]
    assert last_error["class"] == error_class
    assert error.search(last_error["message"]), last_error
    assert status["lastResponse"]["code"] == 200
    cut = CUT_SHORT.match(status["message"])
    assert cut is not None, status["message"]
    assert status["message"] == (
        f"deadline passed after 2 attempts, cutting the last one short after {cut['after']}; "
        f"the one before it failed: {error_class}: {last_error['message']}"
    )
    # From the job service's side: the request was given up at the deadline, not after
    # requestTimeout (30s), and what it had is what the message says.
    _, second = jobs.seen("/slow")
    assert second.gone and second.end is not None
    held = second.end - second.at
    assert 2.0 < held < 3.5, held
    assert abs(parse_duration(cut["after"]) - held) < 0.5, (cut["after"], held)
    assert metric(operator, 'jobwatch_polls_total{reason="DeadlineExceeded"}') == 1


def test_a_watch_that_waited_for_its_secret_says_so_at_the_deadline(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/locked", [PENDING])
    header = {
        "name": "Authorization",
        "valueFrom": {"secretKeyRef": {"name": "absent", "key": "t"}},
    }
    ns.create("locked", {"url": url, "headers": [header], "timeout": "2s", "interval": "200ms"})
    ended = ns.wait_phase("locked", "TimedOut", timeout=15)
    assert ended["message"] == (
        "deadline passed after 0 attempts; no request could be sent: Secret 'absent' "
        f"(header Authorization) was not found in namespace {ns.name}"
    )
    assert "lastError" not in ended
    assert jobs.seen("/locked") == []


def test_a_watch_created_suspended_says_so_and_when_its_deadline_falls(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/asleep", [PENDING])
    ns.create("asleep", {"url": url, "suspend": True, "timeout": "4s", "interval": "100ms"})
    suspended = ns.wait_status(
        "asleep", lambda s: s.get("reason") == "Suspended", 10, "reason Suspended"
    )
    assert reason_column(ns, "asleep") == "Suspended"
    assert suspended["phase"] == "Pending"
    deadline = suspended["deadline"][:19] + "Z"  # to the second
    assert suspended["message"] == (
        f"polling is suspended (spec.suspend); the deadline keeps counting and falls at {deadline}"
    )
    assert {(c["type"], c["reason"]) for c in suspended["conditions"]} == {
        (kind, "Suspended") for kind in ("Ready", "Reconciling", "Stalled", "Finished")
    }
    assert condition(suspended, "Reconciling")["status"] == "True"
    assert "nextPollTime" not in suspended
    accepted = wait_for(lambda: ns.events("asleep"), 10, "the Event of its creation")
    assert [(e.reason, e.message) for e in accepted] == [("Suspended", suspended["message"])]

    ended = ns.wait_phase("asleep", "TimedOut", timeout=15)
    assert ended["message"] == "deadline passed while suspended (spec.suspend) after 0 attempts"
    assert reason_column(ns, "asleep") == "DeadlineExceeded"
    assert jobs.seen("/asleep") == []


def test_suspend_and_resume_show_in_the_reason_and_an_end_while_suspended_keeps_the_error(
    ns: Namespace, jobs: JobServer, operator: Operator
) -> None:
    url = jobs.script("/paused", [PENDING])
    ns.create("paused", {"url": url, "interval": "100ms", **RULES})
    ns.wait_status("paused", lambda s: s.get("attempts", 0) >= 2, 10, "2 attempts")
    ns.patch_spec("paused", {"suspend": True})
    paused = ns.wait_status(
        "paused",
        lambda s: s.get("observedGeneration") == 2 and s.get("reason") == "Suspended",
        10,
        "the suspension to show",
    )
    assert paused["phase"] == "Polling"
    assert paused["lastResponse"]["code"] == 200
    ns.patch_spec("paused", {"suspend": False})
    resumed = ns.wait_status(
        "paused",
        lambda s: s.get("observedGeneration") == 3 and s.get("attempts", 0) > paused["attempts"],
        10,
        "polling again",
    )
    assert (resumed["reason"], resumed["phase"]) == ("Polling", "Polling")

    # Errors, then suspended until the deadline: the end still names the last error.
    jobs.script("/failing", [Reply(500, {"error": "boom"})])
    ns.create(
        "failing",
        {"url": jobs.url("/failing"), "interval": "100ms", "timeout": "4s", **RULES},
    )
    ns.wait_status("failing", lambda s: s.get("consecutiveErrors", 0) >= 2, 10, "2 errors")
    ns.patch_spec("failing", {"suspend": True})
    ns.wait_status("failing", lambda s: s.get("reason") == "Suspended", 10, "the suspension")
    ended = ns.wait_phase("failing", "TimedOut", timeout=15)
    attempts, errors = ended["attempts"], ended["consecutiveErrors"]
    assert attempts == errors == len(jobs.seen("/failing"))
    assert ended["message"] == (
        f"deadline passed while suspended (spec.suspend) after {attempts} attempts; "
        f"the last {errors} failed, the last one: Transient: HTTP 500 from the endpoint"
    )
    assert ended["lastError"] == {"class": "Transient", "message": "HTTP 500 from the endpoint"}
    assert ended["lastResponse"]["code"] == 500


BURST = 2000


def test_a_burst_of_new_watches_leaves_a_few_events_whose_counts_add_up(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    """2,000 JobWatches at once, each Accepted and then Succeeded: 4,000 phase changes
    (one more for any that polled twice). The Event budget stays at its default; the
    status budget is raised so that 2,000 first statuses and 2,000 ends take seconds,
    not the 4 minutes 18 writes/s would take."""
    port = str(free_port())
    op = start_operator(
        JOBWATCH_METRICS_PORT=port,
        JOBWATCH_STATUS_QPS="300",
        JOBWATCH_STATUS_BURST="300",
    )
    url = jobs.script("/done", [Reply(200, {"status": "COMPLETED"})])
    custom = ns.cluster.custom
    started = time.monotonic()

    def create(n: int) -> None:
        ns.create(f"w-{n:04d}", {"url": url, **RULES})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(BURST)))
    created = time.monotonic() - started

    def statuses() -> list[dict[str, Any]]:
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, ns.name, PLURAL)
        return [dict(item.get("status") or {}) for item in listed["items"]]

    def all_succeeded() -> list[dict[str, Any]] | None:
        found = statuses()
        done = [s for s in found if s.get("phase") == "Succeeded"]
        return found if len(done) == BURST else None

    final = wait_for(all_succeeded, 60, f"{BURST} Succeeded", interval=0.5)
    all_done = time.monotonic() - started
    # Pending -> Succeeded, or Pending -> Polling -> Succeeded for a watch polled twice.
    transitions = sum(2 if s["attempts"] == 1 else 3 for s in final)

    def operator_events() -> list[Any]:
        listed = ns.cluster.core.list_namespaced_event(ns.name)
        return [e for e in listed.items if e.involved_object.kind == "JobWatch"]

    def counted() -> list[Any] | None:
        events = operator_events()
        return events if sum(e.count for e in events) >= transitions else None

    events = wait_for(counted, 40, f"Events counting {transitions} phase changes", interval=1)
    settled = time.monotonic() - started
    counts = sum(e.count for e in events)
    names = {f"w-{n:04d}" for n in range(BURST)}
    aggregated = [e for e in events if e.count > 1]
    print(
        f"\n{BURST} watches: created in {created:.1f}s, all Succeeded at {all_done:.1f}s, "
        f"{transitions} phase changes, {len(events)} Events ({len(aggregated)} aggregated) "
        f"with counts summing to {counts} at {settled:.1f}s"
    )
    assert counts == transitions  # none lost, none counted twice
    # The Event burst (25), then about one per kind (2 here) per 10 s: 31-33 measured.
    assert len(events) <= 60, [(e.reason, e.count) for e in events]
    assert {e.reason for e in events} == {"Accepted", "SuccessConditionMet"}
    for event in aggregated:
        assert "(combined from similar events)" in event.message
        named = re.match(
            r"\d+ similar Events from \S+ to \S+ \(combined from similar events\): "
            r"((?:[\w-]+, )*[\w-]+)",
            event.message,
        )
        assert named, event.message
        assert set(named.group(1).split(", ")) <= names  # only this namespace's objects
        assert event.first_timestamp <= event.last_timestamp
    assert metric(op, "jobwatch_events_created_total") == len(events)
    assert metric(op, "jobwatch_events_aggregated_total") == counts - len(events)
    assert metric(op, "jobwatch_events_dropped_total") == 0
