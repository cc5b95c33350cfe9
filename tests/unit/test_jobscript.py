"""The fake job service as the e2e tests and the demo use it (bench/jobscript.py, bench/jobapi.py).

The e2e suite drives `JobServer` against a cluster; these check each of its features
in-process, without one.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import jobapi
import jobhttp
from jobscript import JobServer, Reply, Seen


@pytest.fixture
def server() -> Iterator[JobServer]:
    jobs = JobServer()
    yield jobs
    jobs.close()


def call(
    jobs: JobServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(jobs.host, jobs.port, timeout=5)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def settled(jobs: JobServer, path: str) -> list[Seen]:
    """What `path` saw, once every request has ended: an end is marked just after its
    answer went out, so the client may read the answer first."""
    deadline = time.monotonic() + 2
    while any(s.end is None for s in jobs.seen(path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return jobs.seen(path)


def test_a_path_answers_its_replies_in_order_then_repeats_the_last(server: JobServer) -> None:
    url = server.script("/job", [Reply(503), Reply(200, {"status": "DONE"})])
    assert url == f"http://127.0.0.1:{server.port}/job"
    assert call(server, "GET", "/job")[0] == 503
    for _ in range(2):
        code, headers, body = call(server, "GET", "/job")
        assert (code, json.loads(body)) == (200, {"status": "DONE"})
        assert headers["content-type"] == "application/json"
    assert call(server, "GET", "/elsewhere")[0] == 404
    assert len(server.seen("/job")) == 3


def test_what_a_request_carried_is_seen(server: JobServer) -> None:
    server.script("/post", [Reply(200, "plain text", {"content-type": "text/plain"})])
    code, headers, body = call(
        server, "POST", "/post", b'{"job": 42}', {"content-type": "application/json", "X-A": "1"}
    )
    assert (code, headers["content-type"], body) == (200, "text/plain", b"plain text")
    [seen] = server.seen("/post")
    assert seen.method == "POST"
    assert seen.body == b'{"job": 42}'
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-a"] == "1"
    assert (seen.concurrent, seen.in_server) == (0, 0)
    [seen] = settled(server, "/post")
    assert seen.end is not None and not seen.gone


def test_head_and_redirects(server: JobServer) -> None:
    server.script("/old", [Reply(302, None, {"location": "/new"})])
    server.script("/new", [Reply(200, {"a": 1})])
    code, headers, _ = call(server, "GET", "/old")
    assert (code, headers["location"]) == (302, "/new")
    code, headers, body = call(server, "HEAD", "/new")
    assert (code, headers["content-length"], body) == (200, str(len(b'{"a": 1}')), b"")
    assert server.seen("/new")[0].method == "HEAD"


def test_a_delayed_answer_ends_when_its_client_leaves(server: JobServer) -> None:
    server.script("/slow", [Reply(200, {}, delay=0.5)])
    with socket.create_connection((server.host, server.port)) as leaving:
        leaving.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(0.1)
    started = time.monotonic()
    assert call(server, "GET", "/slow")[0] == 200
    assert time.monotonic() - started >= 0.45
    first, second = settled(server, "/slow")
    assert first.gone and first.end is not None and first.end - first.at < 0.4
    assert not second.gone and second.end is not None
    # The first had left before the second came: nothing in flight beside it.
    assert second.concurrent == 0


def test_requests_in_flight_together_are_counted(server: JobServer) -> None:
    server.script("/p", [Reply(200, {}, delay=0.3)])
    threads = [threading.Thread(target=call, args=(server, "GET", "/p")) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert sorted(s.concurrent for s in server.seen("/p")) == [0, 1, 2]


def test_capacity_queues_the_rest() -> None:
    jobs = JobServer(capacity=2)
    try:
        jobs.script("/c", [Reply(200, {}, delay=0.3)])
        threads = [threading.Thread(target=call, args=(jobs, "GET", "/c")) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        took = time.monotonic() - started
        seen = settled(jobs, "/c")
    finally:
        jobs.close()
    # Two at a time, 0.3 s each: the last two waited for the first two.
    assert 0.55 < took < 2.0
    assert sorted(s.in_server for s in seen) == [0, 1, 2, 3]
    ends = sorted(s.end - started for s in seen if s.end is not None)
    assert len(ends) == 4 and ends[2] > 0.55


def test_the_demo_jobs_go_queued_processing_completed_or_failed() -> None:
    demo = jobapi.Phased(0.1, 0.2)

    def get(job: str) -> dict[str, object]:
        answer = demo.respond(jobhttp.Request("GET", f"/api/jobs/{job}/status", b"", b""))
        assert answer.code == 200
        return dict(json.loads(answer.body))

    assert get("42")["status"] == "QUEUED"
    assert get("fail-1")["status"] == "QUEUED"
    time.sleep(0.15)
    assert get("42")["status"] == "PROCESSING"
    time.sleep(0.2)
    done = get("42")
    assert done["status"] == "COMPLETED"
    assert str(done["resultLink"]).endswith("/42.pdf")
    assert get("fail-1")["status"] == "FAILED"
    created = demo.respond(jobhttp.Request("POST", "/api/jobs", b"", b""))
    assert created.code == 201
    job = json.loads(created.body)
    assert job["statusUrl"] == f"/api/jobs/{job['id']}/status"
    assert demo.respond(jobhttp.Request("GET", "/nowhere", b"", b"")).code == 404


async def test_the_demo_jobs_over_http() -> None:
    loop = asyncio.get_running_loop()
    demo = jobapi.Phased(10.0, 10.0)
    server = await loop.create_server(lambda: jobhttp.HttpProtocol(demo), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/jobs HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
        writer.close()
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert body == {"id": "1000", "statusUrl": "/api/jobs/1000/status"}
