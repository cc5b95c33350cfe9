"""CPU per request of jobwatch's HttpClient against raw aiohttp and plain httpx-aiohttp.

Two modes; either way the server is another process, so the client's CPU time
(process_time of this process) is all that is measured.

Flat out (the default): a small JSON status endpoint is started in a child process,
and each client sends --requests requests with --concurrency in flight:

    .venv/bin/python bench/http_client_cpu.py [--requests 2000] [--concurrency 100] [--uvloop]

Paced (what bench/scale.py runs, once per client, each in its own process): one
client sends --rate requests per second for --seconds against URLs the caller names,
on uvloop like the operator, and prints one JSON line:

    .venv/bin/python bench/http_client_cpu.py paced --client raw \\
        --url 'http://127.0.0.1:8089/api/jobs/x-{}/status' --rate 2000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import aiohttp
import httpx
import uvloop
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from jobwatch.core.outcome import Response
from jobwatch.jobservice.client import HttpClient, Request
from jobwatch.jobservice.egress import EgressPolicy

BODY = b'{"status": "RUNNING", "progress": 42, "message": "still working"}'

# One request to a URL; raises on anything but a 200 with its body read.
Call = Callable[[str], Awaitable[None]]
ClientFactory = Callable[[int, tuple[tuple[str, str], ...]], AbstractAsyncContextManager[Call]]


@asynccontextmanager
async def raw_aiohttp(
    connections: int, headers: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[Call]:
    """aiohttp as plainly as it gets: the floor jobwatch's client is compared with."""
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(url: str) -> None:
            async with session.get(url, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")

        yield call


@asynccontextmanager
async def httpx_aiohttp(
    connections: int, headers: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[Call]:
    """httpx on aiohttp's pool, without jobwatch's guard, cap and redirect handling.

    With the transport's default pool limits, as this benchmark always had it
    (`connections` is ignored: only the flat-out mode runs this client).
    """
    async with httpx.AsyncClient(transport=AiohttpTransport(), timeout=30) as client:

        async def call(url: str) -> None:
            response = await client.get(url, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")

        yield call


@asynccontextmanager
async def jobwatch_http(
    connections: int, headers: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[Call]:
    """The operator's own client, configured as the operator configures it."""
    client = HttpClient(EgressPolicy(), max_connections=connections)

    async def call(url: str) -> None:
        outcome = await client.send(Request("GET", url, headers=headers, timeout=30))
        if not (isinstance(outcome, Response) and outcome.code == 200):
            raise RuntimeError(str(outcome))

    try:
        yield call
    finally:
        await client.aclose()


CLIENTS: dict[str, tuple[str, ClientFactory]] = {
    "raw": ("raw aiohttp", raw_aiohttp),
    "httpx": ("httpx + AiohttpTransport", httpx_aiohttp),
    "jobwatch": ("jobwatch HttpClient", jobwatch_http),
}

# --- flat out --------------------------------------------------------------


def serve(ready: Connection) -> None:
    async def status(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/status", status)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        ready.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def run(
    label: str, call: Callable[[], Awaitable[None]], requests: int, concurrency: int
) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    async def batch(total: int) -> None:
        share, extra = divmod(total, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))

    await batch(min(requests, 500))  # warm the pools and caches
    cpu, wall = time.process_time(), time.perf_counter()
    await batch(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{label:<28} {cpu / requests * 1000:6.3f} ms CPU/request"
        f"   {requests / wall:7.0f} requests/s"
    )


async def flat_out(port: int, requests: int, concurrency: int) -> None:
    url = f"http://127.0.0.1:{port}/status"
    # The Authorization header as a JobWatch with a Secret-valued header would send it;
    # raw aiohttp sends none (as before the refactoring, so the figures stay comparable).
    token = (("Authorization", "Bearer token"),)
    for key, headers in (("raw", ()), ("httpx", token), ("jobwatch", token)):
        label, factory = CLIENTS[key]
        async with factory(100, headers) as call:

            async def one(call: Call = call) -> None:
                await call(url)

            await run(label, one, requests, concurrency)


# --- paced -----------------------------------------------------------------


@dataclass
class PacedResult:
    client: str
    rate: float  # asked for, requests/s
    seconds: float  # measured part
    requests: int
    errors: int
    achieved_per_s: float
    cpu_ms_per_request: float
    loop: str = "uvloop"


TICK = 0.005  # seconds between pacing steps; each step sends what has come due


async def paced(
    call: Call, urls: Sequence[str], rate: float, seconds: float, in_flight: int
) -> tuple[int, int, float, float]:
    """Sends rate * seconds requests on schedule; (requests, errors, CPU s, wall s).

    Bounded in count (rate * seconds requests) and in time (each request has a 30 s
    timeout, and there are at most `in_flight` outstanding).
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(in_flight)
    pending: set[asyncio.Task[None]] = set()
    errors = 0

    async def one(url: str) -> None:
        nonlocal errors
        try:
            await call(url)
        except Exception:
            errors += 1
        finally:
            slots.release()

    total = max(1, round(rate * seconds))
    cpu, start = time.process_time(), loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while sent < due:
            await slots.acquire()
            task = loop.create_task(one(urls[sent % len(urls)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        # Until the next request is due, but at least a tick: at low rates a fixed
        # tick would cost more CPU than the requests and blur the comparison.
        await asyncio.sleep(max(TICK, start + sent / rate - loop.time()))
    if pending:
        await asyncio.gather(*pending)
    return total, errors, time.process_time() - cpu, loop.time() - start


async def paced_main(
    key: str, url: str, *, rate: float, seconds: float, warmup: float, ids: int, in_flight: int
) -> PacedResult:
    label, factory = CLIENTS[key]
    urls = [url.format(i) for i in range(ids)]
    async with factory(in_flight, ()) as call:
        await paced(call, urls, rate, warmup, in_flight)  # connections, caches
        requests, errors, cpu, wall = await paced(call, urls, rate, seconds, in_flight)
    return PacedResult(
        client=label,
        rate=rate,
        seconds=seconds,
        requests=requests,
        errors=errors,
        achieved_per_s=requests / wall,
        cpu_ms_per_request=cpu / requests * 1000,
    )


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["paced"]:
        parser = argparse.ArgumentParser(description="one client, paced; prints a JSON line")
        parser.add_argument("--client", choices=sorted(CLIENTS), required=True)
        parser.add_argument("--url", required=True, help="'{}' is replaced by 0 … --ids-1")
        parser.add_argument("--rate", type=float, required=True, help="requests per second")
        parser.add_argument("--seconds", type=float, default=20.0, help="measured part")
        parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured lead-in")
        parser.add_argument("--ids", type=int, default=1000, help="distinct URLs, in turn")
        parser.add_argument("--in-flight", type=int, default=200, help="as the operator's")
        args = parser.parse_args(argv[1:])
        result = uvloop.run(
            paced_main(
                args.client,
                args.url,
                rate=args.rate,
                seconds=args.seconds,
                warmup=args.warmup,
                ids=args.ids,
                in_flight=args.in_flight,
            )
        )
        print(json.dumps(asdict(result)), flush=True)
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args(argv)

    receiver, sender = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(sender,), daemon=True)
    server.start()
    try:
        server_port: int = receiver.recv()
        if args.uvloop:
            uvloop.run(flat_out(server_port, args.requests, args.concurrency))
        else:
            asyncio.run(flat_out(server_port, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main(sys.argv[1:])
