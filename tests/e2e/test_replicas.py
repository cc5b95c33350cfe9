"""Replicas sharing the fleet through Leases (docs/architecture.md, "Replicas and Leases").

Several operator processes run at once, each with the operator ServiceAccount's token and
JOBWATCH_LEASE_NAMESPACE set, against the real API server; the job API records every
request per job. Whatever happens to a replica (kill -9, SIGTERM, SIGSTOP past its lease,
a new one joining, the API server away), the job service must see each job polled by one
replica at a time: no two requests for a job closer than 0.9 x interval, none concurrent.

Short lease timings keep the tests quick: duration 4 s, renew deadline 3 s, retry 0.5 s.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import OPERATOR_NAMESPACE
from harness import ControlPlane, JobServer, Namespace, Operator, Reply, free_port, gaps, wait_for

from jobwatch.leases import bucket_of

pytestmark = pytest.mark.e2e

WATCHES = 240
BUCKETS = 32
INTERVAL = 3.0
REQUEST_TIMEOUT = 2.0
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 4.0, 3.0, 0.5
RUNNING = Reply(200, {"status": "RUNNING"})
SPEC = {
    "interval": f"{INTERVAL:g}s",
    # A replica that vanishes (kill -9, a freeze) may leave a request open at the job
    # service: its watches are polled again once that request's timeout has passed.
    "requestTimeout": f"{REQUEST_TIMEOUT:g}s",
    "timeout": "30m",
    "successWhen": 'response.body.status == "DONE"',
}
# Two requests of one job closer than this would mean two replicas polled it. The
# timing floor is 0.9 x interval; the job service's clock sees a request a little
# after the operator sent it, and a little more or less so on a loaded machine.
SHORTEST_GAP = 0.9 * INTERVAL - 0.15
# A stopped replica's writes that were already decided go out this soon after it wakes.
WAKE_WRITES = 0.5


class Replicas:
    """Operator processes sharing one lease group, each with its own log and metrics."""

    def __init__(self, ns: Namespace, kubeconfig: Path, logs: Path) -> None:
        self.ns, self.kubeconfig, self.logs = ns, kubeconfig, logs
        self.group = f"e2e-{uuid.uuid4().hex[:8]}"
        self.running: dict[str, tuple[Operator, int]] = {}
        self.stopped: list[Operator] = []

    def start(self, name: str) -> Operator:
        port = free_port()
        operator = Operator(
            self.kubeconfig,
            self.ns.name,
            self.logs / f"{name}.log",
            {
                "JOBWATCH_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
                "JOBWATCH_LEASE_GROUP": self.group,
                "JOBWATCH_IDENTITY": name,
                "JOBWATCH_BUCKETS": str(BUCKETS),
                "JOBWATCH_LEASE_DURATION": f"{LEASE_DURATION:g}s",
                "JOBWATCH_LEASE_RENEW_DEADLINE": f"{RENEW_DEADLINE:g}s",
                "JOBWATCH_LEASE_RETRY_PERIOD": f"{RETRY_PERIOD:g}s",
                "JOBWATCH_METRICS_PORT": str(port),
                "JOBWATCH_HOST_QPS": "1000",
                "JOBWATCH_HOST_MAX_IN_FLIGHT": "1000",
                "JOBWATCH_LOG_LEVEL": os.environ.get("JW_DEBUG_LEVEL", "INFO"),
            },
        ).start()
        self.running[name] = (operator, port)
        return operator

    def held(self, name: str) -> set[int]:
        """The buckets a replica says it holds (its metrics)."""
        _, port = self.running[name]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return set()
        return {int(b) for b in re.findall(r'jobwatch_bucket_held\{bucket="(\d+)"\} 1', text)}

    def polls(self, name: str) -> float:
        _, port = self.running[name]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(v) for v in re.findall(r"^jobwatch_polls_total\{[^}]*\} (\S+)", text, re.M)
        )

    def settled(self, names: list[str]) -> dict[str, set[int]] | None:
        """Every bucket held, each by one of `names`, shared fairly; else None."""
        held = {name: self.held(name) for name in names}
        every = [b for buckets in held.values() for b in buckets]
        fair = {BUCKETS // len(names), -(-BUCKETS // len(names))}
        if sorted(every) == list(range(BUCKETS)) and {len(b) for b in held.values()} <= fair:
            return held
        return None

    def close(self) -> None:
        for operator, _ in self.running.values():
            if operator.process is not None and operator.process.poll() is None:
                operator.process.send_signal(signal.SIGCONT)
                operator.kill()


@pytest.fixture
def replicas(ns: Namespace, operator_kubeconfig: Path, test_logs: Path) -> Iterator[Replicas]:
    group = Replicas(ns, operator_kubeconfig, test_logs)
    yield group
    group.close()


def share_a_fleet(
    ns: Namespace, jobs: JobServer, replicas: Replicas, names: list[str]
) -> list[str]:
    """Starts these replicas and the fleet; returns once they share the buckets and every
    job has been polled since (its paths at the job service)."""
    for name in names:
        replicas.start(name)
    paths = create_fleet(ns, jobs)
    wait_for(lambda: replicas.settled(names), 60, f"{names} sharing the buckets")
    wait_all_polled(ns, jobs, paths, time.monotonic(), 30)
    return paths


def create_fleet(ns: Namespace, jobs: JobServer) -> list[str]:
    paths = [f"/job/{n}" for n in range(WATCHES)]
    for n, path in enumerate(paths):
        ns.create(f"w{n}", {"url": jobs.script(path, [RUNNING]), **SPEC})
    return paths


def unpolled_since(jobs: JobServer, paths: list[str], since: float) -> list[str]:
    return [p for p in paths if not any(s.at >= since for s in jobs.seen(p))]


def wait_all_polled(
    ns: Namespace, jobs: JobServer, paths: list[str], since: float, timeout: float
) -> None:
    """Every job polled since `since`; else fail naming a few that were not, and why."""
    deadline = time.monotonic() + timeout
    while (left := unpolled_since(jobs, paths, since)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        names = [f"w{p.rsplit('/', 1)[1]}" for p in left[:3]]
        detail = {
            n: {
                k: ns.status(n).get(k)
                for k in ("attempts", "reason", "lastPollTime", "nextPollTime")
            }
            for n in names
        }
        raise AssertionError(f"{len(left)} jobs not polled within {timeout:g} s, e.g. {detail}")


def assert_polled_once_at_a_time(
    jobs: JobServer, paths: list[str], woke: float | None = None
) -> float:
    """No job polled by two replicas: each request at least 0.9 x interval after the
    last one, and none while another of the same job was being answered. Returns the
    shortest gap seen.

    `woke`: when a stopped replica was continued. A request it had decided to send
    before it was stopped (checked its bucket, not yet written) goes out as it wakes:
    without fencing tokens no lease can stop that one (docs/architecture.md). Such a
    request, arriving within WAKE_WRITES of `woke`, is left out; any later one counts."""
    shortest = float("inf")
    for path in paths:
        seen = [s for s in jobs.seen(path) if woke is None or not woke <= s.at < woke + WAKE_WRITES]
        assert all(s.concurrent == 0 for s in seen), f"{path}: two requests at once"
        if len(seen) > 1:
            gap = min(gaps(seen))
            assert gap >= SHORTEST_GAP, f"{path}: two requests {gap:.2f} s apart"
            shortest = min(shortest, gap)
    return shortest


def longest_gap_between(jobs: JobServer, paths: list[str], start: float, end: float) -> float:
    """The longest time a job went unpolled, counting from its last request before
    `start` to its first after it, for gaps that overlap [start, end]."""
    longest = 0.0
    for path in paths:
        times = [s.at for s in jobs.seen(path)]
        for a, b in itertools.pairwise(times):
            if b >= start and a <= end:
                longest = max(longest, b - a)
    return longest


def test_replicas_share_the_fleet_fail_over_and_take_in_a_newcomer(
    ns: Namespace, jobs: JobServer, replicas: Replicas
) -> None:
    names = ["r0", "r1", "r2"]
    paths = share_a_fleet(ns, jobs, replicas, names)

    # --- the load is shared: polls per replica within ±25 % of the mean -------------
    before = {name: replicas.polls(name) for name in names}
    time.sleep(4 * INTERVAL)
    load = {name: replicas.polls(name) - before[name] for name in names}
    mean = sum(load.values()) / len(load)
    print(f"\npolls per replica over {4 * INTERVAL:g} s: {load}")
    assert all(abs(n - mean) <= 0.25 * mean for n in load.values()), load

    # --- kill -9 of one replica: the others take its watches within the lease
    # duration and one interval ---------------------------------------------------
    victim_buckets = replicas.held("r2")
    victim, _ = replicas.running.pop("r2")
    attempts_before = {n: ns.status(f"w{n}").get("attempts", 0) for n in range(0, WATCHES, 10)}
    victim.kill()
    killed = time.monotonic()
    survivors = ["r0", "r1"]
    wait_for(lambda: replicas.settled(survivors), LEASE_DURATION + 10, "r0 and r1 take over")
    taken = time.monotonic() - killed
    wait_all_polled(ns, jobs, paths, killed + 0.5, LEASE_DURATION + 3 * INTERVAL)
    # The victim's jobs, from the job service's records: polled again within the lease
    # duration and one interval of the kill; the gap around it is at most that plus the
    # interval that had begun before it, and a round or two to see the Lease expire.
    orphans = [
        p for n, p in enumerate(paths) if bucket_of(ns.name, f"w{n}", BUCKETS) in victim_buckets
    ]
    back = max(min(s.at for s in jobs.seen(p) if s.at > killed) - killed for p in orphans)
    worst = longest_gap_between(jobs, orphans, killed, time.monotonic())
    print(
        f"kill -9: {len(orphans)} jobs of {len(victim_buckets)} buckets polled again at most "
        f"{back:.1f} s after the kill (all buckets shared again after {taken:.1f} s); "
        f"longest gap {worst:.1f} s"
    )
    assert back <= LEASE_DURATION + INTERVAL
    # Their first request waits for one the victim may have left open at the job
    # service: until its request timeout after the victim's renew deadline.
    vanished = max(LEASE_DURATION, RENEW_DEADLINE + REQUEST_TIMEOUT)
    assert worst <= INTERVAL * 1.1 + vanished + 2 * RETRY_PERIOD * 1.1 + 1.0
    # Attempts carry on (adopted from status, not restarted).
    for n, attempts in attempts_before.items():
        assert ns.status(f"w{n}").get("attempts", 0) >= attempts

    # --- a replica joins: it gets its share by handover, nothing polled twice ------
    replicas.start("r3")
    joined = time.monotonic()
    wait_for(lambda: replicas.settled(["r0", "r1", "r3"]), 30, "r3 taking its share")
    print(
        f"join: r3 holds {len(replicas.held('r3'))} buckets after {time.monotonic() - joined:.1f} s"
    )
    time.sleep(INTERVAL)
    shortest = assert_polled_once_at_a_time(jobs, paths)
    print(f"shortest gap between two polls of a job over the whole test: {shortest:.2f} s")


def test_sigterm_hands_over_within_seconds(
    ns: Namespace, jobs: JobServer, replicas: Replicas
) -> None:
    paths = share_a_fleet(ns, jobs, replicas, ["r0", "r1"])
    leaving, _ = replicas.running.pop("r1")
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: replicas.held("r0") == set(range(BUCKETS)), 10, "r0 holding everything")
    handover = time.monotonic() - stopped
    took = leaving.stop()  # waits for the exit (the rest of its flush)
    print(
        f"\nSIGTERM: r0 held every bucket {handover:.1f} s after it; r1 exited {took:.1f} s later"
    )
    assert handover <= 5.0
    since = time.monotonic()
    wait_all_polled(ns, jobs, paths, since, 2 * INTERVAL + 5)
    worst = longest_gap_between(jobs, paths, stopped, time.monotonic())
    print(f"longest gap {worst:.1f} s (interval {INTERVAL:g} s)")
    assert worst <= INTERVAL * 1.1 + 5.0
    assert_polled_once_at_a_time(jobs, paths)


def test_a_replica_stopped_past_its_lease_polls_nothing_it_lost(
    ns: Namespace, jobs: JobServer, replicas: Replicas
) -> None:
    paths = share_a_fleet(ns, jobs, replicas, ["r0", "r1"])
    sleeper, _ = replicas.running["r1"]
    assert sleeper.process is not None
    sleeper.process.send_signal(signal.SIGSTOP)
    wait_for(
        lambda: replicas.held("r0") == set(range(BUCKETS)), LEASE_DURATION + 10, "r0 takes over"
    )
    time.sleep(INTERVAL)
    sleeper.process.send_signal(signal.SIGCONT)
    woke = time.monotonic()
    # It finds its buckets taken, drops them, and then takes its share back by handover.
    wait_for(lambda: replicas.settled(["r0", "r1"]), 30, "sharing again")
    time.sleep(2 * INTERVAL)
    shortest = assert_polled_once_at_a_time(jobs, paths, woke)
    print(
        f"\nSIGSTOP/SIGCONT: shortest gap {shortest:.2f} s; "
        f"shared again {time.monotonic() - woke:.1f} s after waking"
    )


def test_api_server_away_longer_than_the_lease_stops_everyone_then_all_resume(
    ns: Namespace, jobs: JobServer, replicas: Replicas, control_plane: ControlPlane
) -> None:
    paths = share_a_fleet(ns, jobs, replicas, ["r0", "r1"])
    try:
        control_plane.stop("kube-apiserver")
        away = time.monotonic()
        time.sleep(LEASE_DURATION * 2)
    finally:
        restarting = time.monotonic()
        control_plane.start("kube-apiserver")
    # Nothing polled from the renew deadline on (the last renewal was at most a retry
    # period before the server went, plus a little for a loaded machine) until the
    # server was started again: no replica could know its buckets were still its own.
    quiet_from = away + RENEW_DEADLINE + 0.5
    during = [s.at for p in paths for s in jobs.seen(p) if quiet_from <= s.at < restarting]
    before = [s.at for p in paths for s in jobs.seen(p) if away <= s.at < quiet_from]
    print(
        f"\nAPI server away {restarting - away:.1f} s: {len(before)} polls before the renew "
        f"deadline, {len(during)} after it"
    )
    assert during == []
    wait_for(lambda: replicas.settled(["r0", "r1"]), 60, "sharing again")
    since = time.monotonic()
    wait_all_polled(ns, jobs, paths, since, 2 * INTERVAL + 10)
    assert_polled_once_at_a_time(jobs, paths)
