"""The scale benchmark's arithmetic and its job API's latency model (bench/)."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

import benchstats as st
import jobapi
import jobhttp


def test_gaps_belong_to_the_span_of_their_later_request() -> None:
    requests = {"a": [0.0, 5.0, 10.5, 20.0], "b": [4.0, 9.0], "c": [12.0]}
    assert sorted(st.gaps(requests, 5.0, 11.0)) == [5.0, 5.0, 5.5]
    assert st.gaps(requests, 11.0, 30.0) == [9.5]
    # One request alone makes no gap.
    assert st.gaps({"c": [12.0]}, 0.0, 30.0) == []


def test_gap_summary_counts_gaps_over_the_bound_and_its_percentiles() -> None:
    values = [5.0] * 97 + [5.6, 5.8, 9.0]
    summary = st.gap_summary(values, late_after=5.75)
    assert summary["count"] == 100
    assert summary["mean_s"] == 5.054
    assert summary["p1_s"] == 5.0
    assert summary["p50_s"] == 5.0
    assert summary["p99_s"] == 5.8
    assert summary["max_s"] == 9.0
    assert summary["late"] == 2
    assert summary["late_share"] == 0.02


def test_gap_summary_of_no_gaps_says_nothing() -> None:
    summary = st.gap_summary([], late_after=5.75)
    assert summary["count"] == 0
    assert summary["mean_s"] is None
    assert summary["p99_s"] is None
    assert summary["late_share"] is None


def request_line(code: int, resource: str, subresource: str, verb: str, count: int) -> str:
    return (
        f'apiserver_request_total{{code="{code}",component="apiserver",dry_run="",group="",'
        f'resource="{resource}",scope="resource",subresource="{subresource}",verb="{verb}",'
        f'version="v1"}} {count}'
    )


METRICS = "\n".join(
    [
        "# HELP apiserver_request_total Counter of apiserver requests",
        request_line(200, "jobwatches", "status", "PATCH", 40),
        request_line(409, "jobwatches", "status", "PATCH", 3),
        request_line(429, "jobwatches", "status", "PATCH", 2),
        request_line(201, "events", "", "POST", 7),
        request_line(403, "events", "", "POST", 1),
        request_line(200, "jobwatches", "", "LIST", 99),
        'apiserver_flowcontrol_rejected_requests_total{flow_schema="x",priority_level="y",'
        'reason="queue-full"} 4',
    ]
)


def test_apiserver_counters_count_writes_by_outcome_from_the_servers_side() -> None:
    counters = st.apiserver_counters(METRICS)
    assert counters["status_patches"] == 40
    assert counters["status_patch_failures"] == 5  # the 409s and the 429s
    assert counters["events_created"] == 7
    assert counters["event_failures"] == 1
    assert counters["429"] == 2
    assert counters["rejected_apf"] == 4
    assert counters["write PATCH jobwatches/status 409"] == 3
    assert counters["write POST events 201"] == 7
    # Reads are no writes.
    assert not any(key.startswith("write LIST") for key in counters)


def test_latency_parses_and_draws_the_median_p99_and_hang_share_it_was_given() -> None:
    latency = jobapi.parse_latency("lognormal:median=50ms,p99=1s,hang=0.5%")
    assert latency == jobapi.Latency(0.05, 1.0, 0.005)
    rng = random.Random(7)
    draws = [latency.draw(rng) for _ in range(40_000)]
    answered = sorted(d for d in draws if d is not None)
    hung = len(draws) - len(answered)
    assert 0.003 < hung / len(draws) < 0.007
    assert answered[len(answered) // 2] == pytest.approx(0.05, rel=0.05)
    assert answered[int(len(answered) * 0.99)] == pytest.approx(1.0, rel=0.15)
    assert sum(answered) / len(answered) == pytest.approx(latency.mean, rel=0.1)
    assert jobapi.parse_latency(latency.spec()) == latency


@pytest.mark.parametrize(
    "text",
    [
        "uniform:median=1s,p99=2s",
        "lognormal:median=1s",
        "lognormal:median=2s,p99=1s",
        "lognormal:median=50ms,p99=1s,hang=0.5",
        "lognormal:median=50ms,p99=1s,hang=100%",
        "lognormal:median=50ms,median=60ms,p99=1s",
        "lognormal:median=fast,p99=1s",
    ],
)
def test_latency_rejects_what_it_cannot_mean(text: str) -> None:
    with pytest.raises(ValueError, match="latency"):
        jobapi.parse_latency(text)


def test_no_latency_is_none() -> None:
    assert jobapi.parse_latency("none") is None


def test_a_job_ends_at_a_wall_clock_time_whatever_its_polls() -> None:
    jobs = jobapi.Jobs(1, 200.0, 0.0, mean_seconds=1e-9)
    assert b'"COMPLETED"' in jobs.poll("j1")  # ends a nanosecond after its first poll
    polls, first, answered, ended = jobs.per_job()["j1"]
    assert polls == 1
    assert first is not None and ended is not None and answered is not None
    assert first <= ended <= answered
    pending = jobapi.Jobs(1, 200.0, 0.0, mean_seconds=1e9)
    assert b'"PROCESSING"' in pending.poll("j1")
    # An end still to come is not told.
    assert pending.per_job()["j1"][3] is None
    assert len(pending.request_times()["j1"]) == 1


def test_answer_gaps_time_from_the_answer_and_skip_what_was_never_answered() -> None:
    requests = {"a": [0.0, 5.5, 20.0, 26.0], "b": [1.0, 6.0]}
    delays = {"a": [0.5, -1.0, 1.0]}  # b's answers were instant: no delays recorded
    found, unanswered = st.answer_gaps(requests, delays, 0.0, 30.0)
    assert sorted(found) == [5.0, 5.0, 5.0]
    assert unanswered == 1
    found, unanswered = st.answer_gaps(requests, delays, 21.0, 30.0)
    assert (found, unanswered) == ([5.0], 0)


class ScriptedDelays(jobapi.Jobs):
    """Answers delayed by a given amount per job id, to check the protocol's timing."""

    def __init__(self, delays: dict[str, float | None]) -> None:
        super().__init__(1, 200.0, 1.0)  # every job pending
        self.scripted = delays

    def delay(self, job_id: str) -> float | None:
        return self.scripted.get(job_id, 0.0)


async def serve(jobs: jobapi.Jobs) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: jobhttp.HttpProtocol(jobs), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_delayed_answers_wait_together_not_in_turn() -> None:
    jobs = jobapi.Jobs(1, 200.0, 1.0, latency=jobapi.Latency(0.3, 0.31, 0.0))
    server, port = await serve(jobs)
    async with server, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def poll(i: int) -> int:
            async with http.get(f"http://127.0.0.1:{port}/api/jobs/j{i}/status") as response:
                await response.read()
                return response.status

        started = time.monotonic()
        async with asyncio.timeout(10):
            codes = await asyncio.gather(*(poll(i) for i in range(300)))
        took = time.monotonic() - started
    assert codes == [200] * 300
    assert jobs.delayed == 300
    # Each answer waited about 0.3 s; 300 of them one after the other would take 90 s.
    assert 0.25 < took < 5.0


async def test_pipelined_answers_keep_their_order_and_a_hung_one_stops_the_rest() -> None:
    jobs = ScriptedDelays({"j1": 0.3, "j2": 0.0, "j3": None, "j4": 0.0})
    server, port = await serve(jobs)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"".join(
                f"GET /api/jobs/j{i}/status HTTP/1.1\r\nhost: x\r\n\r\n".encode()
                for i in (1, 2, 3, 4)
            )
        )
        received = b""
        async with asyncio.timeout(5):
            while received.count(b'"id"') < 2:
                received += await reader.read(65536)
        # Nothing after the hung request: j4 never comes, though it would be instant.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                received += await reader.read(65536)
        writer.close()
    assert received.index(b'"j1"') < received.index(b'"j2"')
    assert b'"j3"' not in received and b'"j4"' not in received
    # A request after the hung one is not even read: the client gives up on the connection.
    assert jobs.request_times().keys() == {"j1", "j2", "j3"}


async def test_spans_end_at_the_answer_or_when_the_client_leaves() -> None:
    jobs = jobapi.Jobs(1, 200.0, 1.0, slow=frozenset({"j0"}), slow_seconds=0.5)
    server, port = await serve(jobs)
    async with server:
        # j0 is slow: this client leaves 0.1 s into its 0.5 s answer.
        _, leaving = await asyncio.open_connection("127.0.0.1", port)
        leaving.write(b"GET /api/jobs/j0/status HTTP/1.1\r\nhost: x\r\n\r\n")
        await leaving.drain()
        await asyncio.sleep(0.1)
        leaving.close()
        async with aiohttp.ClientSession() as http, asyncio.timeout(5):
            for job in ("j0", "j1"):
                async with http.get(f"http://127.0.0.1:{port}/api/jobs/{job}/status") as r:
                    await r.read()
    spans = jobs.request_spans()
    durations = [end - arrival for arrival, end in spans["j0"] if end is not None]
    assert len(durations) == 2
    left, answered = durations
    assert 0.05 < left < 0.4  # ended when its client left, not at its answer
    assert 0.45 < answered < 1.0
    [(arrival, end)] = spans["j1"]
    assert end is not None and 0 <= end - arrival < 0.1
    assert jobs.delayed == 2  # the slow job's, whatever --latency says
