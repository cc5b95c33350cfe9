"""bench/replicas_figures.py: settled buckets, takeover times, duplicate polls."""

from __future__ import annotations

import datetime
import zlib
from typing import Any

import pytest

import jobapi
import replicas_figures

INTERVAL = 5.0


def test_settled_needs_every_bucket_exactly_once() -> None:
    assert replicas_figures.settled({"a": [0, 1], "b": [2, 3]}, 4)
    assert not replicas_figures.settled({"a": [0, 1], "b": [2]}, 4)  # bucket 3 unowned
    assert not replicas_figures.settled({"a": [0, 1, 2], "b": [2, 3]}, 4)  # bucket 2 held twice
    assert not replicas_figures.settled({"a": [], "b": []}, 4)


def test_bucket_is_crc32_of_namespace_and_name() -> None:
    # The contract of issue #9, which the harness must share with the operator.
    name = "w00042"
    expected = zlib.crc32(f"jobwatch-bench/{name}".encode()) % 32
    assert replicas_figures.bucket_of(name, 32) == expected
    jobs = replicas_figures.jobs_of_buckets(100, 32, [expected])
    assert "j42" in jobs
    assert all(
        replicas_figures.bucket_of(replicas_figures.watch_name(int(j[1:])), 32) == expected
        for j in jobs
    )


def test_bucket_is_the_operators() -> None:
    leases = pytest.importorskip("jobwatch.control.sharding.leases")
    for i in range(500):
        name = replicas_figures.watch_name(i)
        assert replicas_figures.bucket_of(name, 32) == leases.bucket_of("jobwatch-bench", name, 32)


def test_duplicates_counts_gaps_below_nine_tenths_of_the_interval() -> None:
    requests = {"j0": [0.0, 5.0, 9.4, 14.4], "j1": [0.0, 4.6, 9.5]}
    # j0: 5.0, 4.4 (a duplicate), 5.0; j1: 4.6, 4.9
    assert replicas_figures.duplicates(requests, 0.0, 100.0, INTERVAL) == 1
    # Only gaps whose later request falls in the span count.
    assert replicas_figures.duplicates(requests, 10.0, 100.0, INTERVAL) == 0


def test_takeover_after_a_kill() -> None:
    at = 100.0
    requests = {
        # polled by the victim at 97, by a survivor from 116 on
        "j0": [92.0, 97.0, 116.0, 121.0],
        # the victim's last request before the kill at 99.5; the survivor's at 118
        "j1": [94.5, 99.5, 118.0],
        # a survivor polled it twice in a row: a duplicate after the takeover
        "j2": [95.0, 117.0, 119.0],
        "j9": [50.0, 55.0],  # not among the jobs taken over
    }
    found = replicas_figures.takeover(
        requests,
        ["j0", "j1", "j2"],
        at=at,
        survivors_from=at + 0.1,
        until=125.0,
        interval=INTERVAL,
    )
    assert found["repolled"] == 3
    assert found["all_repolled_s"] == 18.0
    assert found["longest_gap_s"] == 22.0  # j2: 95 -> 117
    assert found["duplicates"] == 1


def test_takeover_reports_jobs_never_polled_again() -> None:
    found = replicas_figures.takeover(
        {"j0": [95.0, 120.0], "j1": [96.0]},
        ["j0", "j1"],
        at=100.0,
        survivors_from=100.1,
        until=130.0,
        interval=INTERVAL,
    )
    assert found["not_repolled"] == 1
    assert found["not_repolled_examples"] == ["j1"]
    assert found["all_repolled_s"] is None  # never a time that leaves a job out


def test_takeover_after_sigterm_counts_only_requests_after_the_exit() -> None:
    # SIGTERM at 100, the replica exits at 101.5; the request at 100.3 was its own.
    found = replicas_figures.takeover(
        {"j0": [95.6, 100.3, 104.0]},
        ["j0"],
        at=100.0,
        survivors_from=101.5,
        until=110.0,
        interval=INTERVAL,
    )
    assert found["requests_while_stopping"] == 1
    assert found["all_repolled_s"] == 4.0
    assert found["longest_gap_s"] == 8.4  # from the last request before the SIGTERM
    assert found["duplicates"] == 1  # 100.3 -> 104.0: 3.7 s


def test_writes_by_resource_per_second_from_counter_deltas() -> None:
    before = {"write PUT leases 200": 10.0, "status_patches": 3.0}
    after = {"write PUT leases 200": 40.0, "write POST leases 201": 2.0, "status_patches": 9.0}
    assert replicas_figures.writes_by_resource(after, before, 10.0) == {
        "POST leases 201": 0.2,
        "PUT leases 200": 3.0,
    }


def test_apiserver_reads_and_open_watches() -> None:
    text = "\n".join(
        [
            'apiserver_request_total{code="200",component="apiserver",dry_run="",group='
            '"coordination.k8s.io",resource="leases",scope="namespace",subresource="",'
            'verb="LIST",version="v1"} 7',
            'apiserver_request_total{code="200",resource="pods",verb="LIST"} 3',
            'apiserver_longrunning_requests{component="apiserver",group="jobwatch.dev",'
            'resource="jobwatches",scope="cluster",subresource="",verb="WATCH",'
            'version="v1alpha1"} 2',
        ]
    )
    assert replicas_figures.apiserver_reads(text) == {
        "read LIST leases": 7.0,
        "open WATCH jobwatches": 2.0,
    }


def test_events_by_reason_in_the_window_only() -> None:
    items: list[dict[str, Any]] = [
        {
            "reason": "Polled",
            "reportingComponent": "jobwatch",
            "lastTimestamp": "2026-11-30T20:00:10Z",
        },
        {
            "reason": "Polled",
            "source": {"component": "jobwatch"},
            "eventTime": "2026-11-30T20:00:11.5Z",
        },
        {"reason": "Old", "lastTimestamp": "2026-11-30T19:59:59Z"},
        {"reason": "NoTime"},
    ]
    start = datetime.datetime(2026, 11, 30, 20, 0, tzinfo=datetime.UTC).timestamp()
    assert replicas_figures.events_by_reason(items, start, start + 60) == {"Polled (jobwatch)": 2}


def test_in_flight_twice_counts_a_request_sent_while_another_was_out() -> None:
    spans: dict[str, list[tuple[float, float | None]]] = {
        # a handover released the bucket at 13 while the 10 s answer was out; the next
        # holder polled at 13.5: both in flight until 20
        "j0": [(10.0, 20.0), (13.5, 23.5)],
        # one after the other: the next request came as the last answer went out
        "j1": [(10.0, 20.0), (20.0, 30.0), (33.0, 33.1)],
        # the first holder's client gave up at 14 (its connection closed): not in flight
        # when the second came
        "j2": [(10.0, 14.0), (14.5, 24.5)],
    }
    found = replicas_figures.in_flight_twice(spans, 0.0, 100.0, now=200.0)
    assert found == {"jobs": 1, "max_overlap_s": 6.5, "examples": {"j0": 6.5}}


def test_in_flight_twice_takes_the_earlier_request_out_the_longest() -> None:
    # The second request is short, the third arrives while the first is still out.
    spans: dict[str, list[tuple[float, float | None]]] = {
        "j0": [(0.0, 10.0), (1.0, 2.0), (5.0, 15.0)]
    }
    found = replicas_figures.in_flight_twice(spans, 3.0, 100.0, now=200.0)
    # Only the request at 5 falls in the span: out with the first from 5 to 10.
    assert found["jobs"] == 1
    assert found["max_overlap_s"] == 5.0


def test_in_flight_twice_an_open_request_lasts_until_now() -> None:
    spans: dict[str, list[tuple[float, float | None]]] = {
        "j0": [(0.0, None), (4.0, 5.0)],  # the first still unanswered at `now`
        "j1": [(0.0, None)],
    }
    found = replicas_figures.in_flight_twice(spans, 0.0, 100.0, now=8.0)
    assert found["jobs"] == 1
    assert found["max_overlap_s"] == 1.0  # the second, 4 to 5, entirely within the first


def test_in_flight_twice_only_counts_later_requests_in_the_span() -> None:
    spans: dict[str, list[tuple[float, float | None]]] = {"j0": [(0.0, 10.0), (5.0, 15.0)]}
    assert replicas_figures.in_flight_twice(spans, 6.0, 100.0, now=200.0)["jobs"] == 0
    assert replicas_figures.in_flight_twice(spans, 0.0, 5.0, now=200.0)["jobs"] == 0
    assert replicas_figures.in_flight_twice(spans, 5.0, 6.0, now=200.0)["jobs"] == 1
    assert replicas_figures.in_flight_twice({}, 0.0, 1.0, now=2.0) == {
        "jobs": 0,
        "max_overlap_s": 0.0,
        "examples": {},
    }


def test_apiserver_reads_counts_the_bytes_of_jobwatch_answers() -> None:
    text = "\n".join(
        [
            'apiserver_response_sizes_sum{component="apiserver",group="jobwatch.dev",'
            'resource="jobwatches",scope="namespace",subresource="",verb="LIST",'
            'version="v1alpha1"} 1.5e+06',
            'apiserver_response_sizes_sum{component="apiserver",group="jobwatch.dev",'
            'resource="jobwatches",scope="cluster",subresource="",verb="LIST",'
            'version="v1alpha1"} 500000',
            'apiserver_response_sizes_sum{resource="jobwatches",verb="GET"} 2048',
            'apiserver_response_sizes_sum{resource="pods",verb="LIST"} 9999',
            'apiserver_response_sizes_bucket{resource="jobwatches",verb="LIST",le="1000"} 3',
        ]
    )
    assert replicas_figures.apiserver_reads(text) == {
        "bytes LIST jobwatches": 2_000_000.0,
        "bytes GET jobwatches": 2048.0,
    }


def test_status_age_from_last_poll_time() -> None:
    now = datetime.datetime(2026, 12, 1, 0, 1, 30, tzinfo=datetime.UTC).timestamp()
    item = {"status": {"lastPollTime": "2026-12-01T00:00:00.250Z"}}
    assert replicas_figures.status_age(item, now) == pytest.approx(89.75)
    assert replicas_figures.status_age({"status": {}}, now) is None
    assert replicas_figures.status_age({}, now) is None


def test_age_summary_in_seconds_and_intervals() -> None:
    ages = [float(a) for a in range(1, 101)]  # 1 ... 100 s
    found = replicas_figures.age_summary(ages, missing=3, interval=60.0)
    assert found["watches"] == 103
    assert found["without_last_poll_time"] == 3
    assert (found["p50_s"], found["p99_s"], found["max_s"]) == (50.0, 99.0, 100.0)
    assert found["max_intervals"] == 1.67
    assert found["older_than_1_interval_share"] == 0.4  # 61 ... 100
    assert found["older_than_2_intervals_share"] == 0.0
    empty = replicas_figures.age_summary([], missing=5, interval=60.0)
    assert empty["p50_s"] is None
    assert empty["older_than_1_interval_share"] is None


def test_longest_gap_counts_gaps_still_open_at_the_end() -> None:
    requests = {
        "j0": [0.0, 10.0, 20.0, 30.0],
        "j1": [5.0, 40.0],  # 35 s, ending in the span
        "j2": [8.0],  # never polled again: open 42 s at `until`
        "j3": [100.0],  # after `until`: not seen
    }
    found = replicas_figures.longest_gap(requests, start=12.0, until=50.0)
    assert found == {"max_s": 42.0, "job": "j2", "jobs_not_polled_in_span": 1}
    # A gap that ended before the span does not count.
    assert replicas_figures.longest_gap({"j0": [0.0, 30.0, 31.0]}, 31.0, 32.0)["max_s"] == 1.0


def sample(wall: float, available: float, busy: float, **rss: float) -> dict[str, Any]:
    return {"wall": wall, "available_gib": available, "cpu_busy": busy, "rss_mib": rss}


def test_exhaustion_finds_sustained_cpu_saturation_before_memory() -> None:
    samples = [sample(100.0 + 5 * k, 20.0, 0.99, apiserver=100.0 + k) for k in range(14)]
    samples.append(sample(170.0, 1.5, 0.99, apiserver=900.0))
    found = replicas_figures.exhaustion(samples, total_gib=24.0, guard_gib=2.0, since=100.0)
    assert found["first"] == "cpu"
    assert found["cpu_saturated_after_s"] == -5.0  # the first busy sample covers 95 ... 100
    assert found["memory_short_after_s"] == 70.0  # under max(2, 2.4) GiB
    assert found["peak_rss_mib"] == {"apiserver": 900.0}


def test_exhaustion_a_short_busy_spell_is_not_saturation() -> None:
    busy = [sample(5.0 * k, 20.0, 0.99 if k % 10 else 0.5) for k in range(40)]
    found = replicas_figures.exhaustion(busy, total_gib=24.0, guard_gib=2.0, since=0.0)
    assert found["first"] is None
    assert found["cpu_saturated_after_s"] is None
    assert found["min_available_gib"] == 20.0
    assert replicas_figures.exhaustion([], 24.0, 2.0, 0.0)["first"] is None


def test_job_service_records_since_keep_the_request_before() -> None:
    jobs = jobapi.Jobs(1, 200.0, 1.0)
    for job, at, end in [("j0", 1.0, 1.1), ("j0", 2.0, 12.0), ("j0", 3.0, 3.1), ("j0", 5.0, 5.1)]:
        jobs.arrivals.setdefault(job, jobapi.array("d")).append(at)
        jobs.ends.setdefault(job, jobapi.array("d")).append(end)
    jobs.arrivals["j1"], jobs.ends["j1"] = jobapi.array("d", [0.5]), jobapi.array("d", [-1.0])
    assert jobs.request_times(since=4.0) == {"j0": [3.0, 5.0], "j1": [0.5]}
    assert jobs.request_times() == {"j0": [1.0, 2.0, 3.0, 5.0], "j1": [0.5]}
    # The request of 2.0 is out until 12: it can overlap later ones; j1's never ended.
    assert jobs.request_spans(since=4.0) == {
        "j0": [[2.0, 12.0], [3.0, 3.1], [5.0, 5.1]],
        "j1": [[0.5, None]],
    }
    assert jobapi._since("/stats/spans?since=4.5") == 4.5
    assert jobapi._since("/stats/spans?since=x") is None
    assert jobapi._since("/stats/spans") is None
