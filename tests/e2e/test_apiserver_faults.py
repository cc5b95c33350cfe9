"""The API server or etcd going away mid-run: polling goes on, nothing is lost or doubled.

These tests stop and start the local control plane's own processes (ControlPlane in
harness.py), so they are skipped on a cluster the tests do not own
(JOBWATCH_E2E_EXISTING_CLUSTER=1).

Each runs a small fleet at a 1 s interval through one fault and then checks what
API.md promises: every watch keeps polling on its rhythm (or ends), no poll comes
early or overlaps another of the same watch, status catches up within two intervals
of the server's return (attempts made meanwhile, ends reached meanwhile), and
JobWatches created or deleted right after the return are taken in.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from harness import ControlPlane, JobServer, Namespace, Operator, Reply, Seen, gaps, wait_for
from kubernetes import client as k8s

INTERVAL = 1.0
# What API.md allows between two polls of a pending watch: ±10 % spread, plus what a
# 2-core machine running the control plane beside the tests adds.
LONGEST_GAP = INTERVAL * 1.1 + 0.25
SHORTEST_GAP = INTERVAL * 0.9
# After an error the next poll may wait up to the backoff cap (jittered).
MAX_BACKOFF = 2.0
# The operator's API client gives up on a request after this long (kube/client.py): a Secret
# read sent while etcd was away may hold that watch's poll this long.
KUBE_REQUEST_TIMEOUT = 10.0
PENDING = Reply(200, {"status": "PROCESSING"})
DONE = Reply(200, {"status": "COMPLETED"})
STEADY = ("steady-a", "steady-b", "steady-c")


def spec(url: str, **extra: object) -> dict[str, object]:
    return {
        "url": url,
        "interval": "1s",
        "timeout": "10m",
        "successWhen": 'response.body.status == "COMPLETED"',
        "backoff": {"maxInterval": "2s"},
        **extra,
    }


def retried(call: Callable[[], object], what: str) -> float:
    """Makes an API call, again while the server still settles; when it went through."""

    def attempt() -> bool:
        try:
            call()
        except k8s.ApiException as exc:
            if exc.status is not None and exc.status < 500 and exc.status != 429:
                raise
            return False
        return True

    wait_for(attempt, 15, what, interval=0.1)
    return time.monotonic()


@dataclass
class Fleet:
    """Three steady watches, one whose job ends during the fault, one that polls with a
    Secret-valued header (the Secret is read from the API server at every attempt), and
    one that is deleted once the server is back."""

    ns: Namespace
    jobs: JobServer
    asked_before_end: int = 0  # requests to /ends before its job completed

    def create(self) -> None:
        self.ns.secret("token", {"value": "s3cr3t"}, {"jobwatch.dev/allow-use": "true"})
        for name in (*STEADY, "ends", "gone"):
            self.ns.create(name, spec(self.jobs.script(f"/{name}", [PENDING])))
        header = {
            "name": "Authorization",
            "valueFrom": {"secretKeyRef": {"name": "token", "key": "value"}},
        }
        self.ns.create("secret", spec(self.jobs.script("/secret", [PENDING]), headers=[header]))
        for name in (*STEADY, "ends", "gone", "secret"):
            self.ns.wait_status(name, lambda s: s.get("attempts", 0) >= 2, 15, "2 attempts")

    def seen(self, name: str) -> list[Seen]:
        return self.jobs.seen(f"/{name}")

    def end_the_job(self) -> None:
        """The job behind `ends` completes; returns once the operator has asked it."""
        self.asked_before_end = len(self.seen("ends"))
        self.jobs.script("/ends", [DONE])
        wait_for(
            lambda: len(self.seen("ends")) > self.asked_before_end,
            5 * INTERVAL,
            "the operator to ask /ends",
        )

    def caught_up(self, back: float) -> None:
        """Within two intervals of `back` (the server answering again), status shows every
        attempt made while it was away, and the end reached meanwhile."""
        deadline = back + 2 * INTERVAL
        while True:
            lagging: dict[str, str] = {}
            for name in (*STEADY, "ends"):
                status = self.ns.status(name)
                made = sum(1 for s in self.seen(name) if s.at <= back)
                if status.get("attempts", 0) < made:
                    lagging[name] = f"attempts {status.get('attempts')} < {made} made"
                if name == "ends" and status.get("phase") != "Succeeded":
                    lagging[name] = f"phase {status.get('phase')}"
            if not lagging or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        late = time.monotonic() - back
        assert not lagging, f"{late:.1f}s after the server returned, status lags: {lagging}"

    def churn_after(self, back: float) -> None:
        """A JobWatch created and one deleted once the server is back are taken in: the new
        one is polled, the deleted one is not polled again after one interval."""
        created = retried(
            lambda: self.ns.create("newcomer", spec(self.jobs.script("/newcomer", [PENDING]))),
            "creating newcomer",
        )
        deleted = retried(lambda: self.ns.delete("gone"), "deleting gone")
        first = wait_for(lambda: self.seen("newcomer"), 2 * INTERVAL + 5, "newcomer polled")[0]
        assert first.at - created <= 2 * INTERVAL, (
            f"newcomer first polled {first.at - created:.2f}s after its creation"
        )
        wait_for(
            lambda: time.monotonic() > deleted + INTERVAL + 2 * LONGEST_GAP,
            10,
            "a few intervals after the deletion",
        )
        late = [round(s.at - deleted, 2) for s in self.seen("gone") if s.at > deleted + INTERVAL]
        assert not late, f"gone polled after its deletion (seconds after it): {late}"

    def secret_resumes(self, back: float, request_limit: float = 0.0) -> None:
        """The watch that reads a Secret at every attempt polls again after the return,
        and its errors meanwhile were its own (transient, retried), not a lost watch."""
        # One more backoff step than the happy path: the first Secret read after the
        # return may still be refused (403 until the authorizer has loaded RBAC).
        limit = back + request_limit + 2 * MAX_BACKOFF * 1.1 + INTERVAL + 1.0
        wait_for(
            lambda: any(s.at > back for s in self.seen("secret")),
            limit - time.monotonic() + 5,
            "the Secret-header watch to poll again",
        )
        first = next(s for s in self.seen("secret") if s.at > back)
        assert first.at <= limit, f"the Secret-header watch resumed {first.at - back:.1f}s late"
        assert first.headers.get("authorization") == "s3cr3t"
        status = self.ns.wait_status(
            "secret", lambda s: s.get("consecutiveErrors") == 0, 5, "errors cleared"
        )
        assert status["phase"] == "Polling", status

    def rhythm_kept(self) -> None:
        """Every watch without a Secret polled on time the whole run: no gap too long
        (lost or late), none too short (a poll doubled) and never two requests at once;
        the one whose job ended was not asked again."""
        for name in (*STEADY, "ends"):
            seen = self.seen(name)
            got = gaps(seen)
            assert got, name
            long = [round(g, 2) for g in got if g > LONGEST_GAP]
            short = [round(g, 2) for g in got if g < SHORTEST_GAP]
            overlapping = sum(1 for s in seen if s.concurrent)
            assert not long, f"{name}: gaps over {LONGEST_GAP:.2f}s: {long}"
            assert not short, f"{name}: gaps under {SHORTEST_GAP:.2f}s: {short}"
            assert not overlapping, f"{name}: {overlapping} requests overlapped another"
        asked = len(self.seen("ends"))
        assert asked == self.asked_before_end + 1, (
            f"/ends asked {asked - 1 - self.asked_before_end} times after its end"
        )


@pytest.fixture
def faults(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The control plane, whole again after the test, whatever happened in it."""
    yield control_plane
    control_plane.heal()


def compact_etcd(control_plane: ControlPlane) -> None:
    """Writes a key nobody watches and compacts etcd up to it: every resourceVersion a
    client saw before is now too old, and a watch resumed from one gets 410 Gone."""
    key = base64.b64encode(b"/jobwatch-e2e/bump").decode()
    put = control_plane.etcd("kv/put", {"key": key, "value": base64.b64encode(b"1").decode()})
    revision = put["header"]["revision"]
    control_plane.etcd("kv/compaction", {"revision": revision, "physical": True})


def test_apiserver_restart_with_expired_resource_version(
    ns: Namespace, jobs: JobServer, operator: Operator, faults: ControlPlane
) -> None:
    fleet = Fleet(ns, jobs)
    fleet.create()
    faults.stop("kube-apiserver")
    fleet.end_the_job()
    compact_etcd(faults)
    faults.start("kube-apiserver")
    back = time.monotonic()
    fleet.caught_up(back)
    fleet.churn_after(back)
    fleet.secret_resumes(back)
    fleet.rhythm_kept()
    # The resumed watch got 410 Gone and listed again, without polling anyone early
    # (rhythm_kept) and without losing or re-starting anyone (attempts carried on).
    assert "expired; listing again" in operator.logs()


def test_etcd_restart(
    ns: Namespace, jobs: JobServer, operator: Operator, faults: ControlPlane
) -> None:
    fleet = Fleet(ns, jobs)
    fleet.create()
    faults.stop("etcd")
    fleet.end_the_job()
    faults.start("etcd")
    # Back means the API server answers again: it reconnects to etcd on its own.
    wait_for(lambda: faults.ready("kube-apiserver"), 60, "the API server to be ready")
    back = time.monotonic()
    fleet.caught_up(back)
    fleet.churn_after(back)
    fleet.secret_resumes(back, request_limit=KUBE_REQUEST_TIMEOUT)
    fleet.rhythm_kept()


def test_apiserver_away_for_a_minute(
    ns: Namespace, jobs: JobServer, operator: Operator, faults: ControlPlane
) -> None:
    fleet = Fleet(ns, jobs)
    fleet.create()
    faults.stop("kube-apiserver")
    away_since = time.monotonic()
    fleet.end_the_job()
    # The fault itself is a length of time: nothing to wait on but the clock.
    time.sleep(max(0.0, away_since + 60 - time.monotonic()))
    faults.start("kube-apiserver")
    back = time.monotonic()
    fleet.caught_up(back)
    fleet.churn_after(back)
    fleet.secret_resumes(back)
    fleet.rhythm_kept()
    polled = {name: len(fleet.seen(name)) for name in STEADY}
    assert all(count >= 60 for count in polled.values()), polled
