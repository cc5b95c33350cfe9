"""CPU per request of jobwatch's HttpClient against raw aiohttp and plain httpx-aiohttp.

A small JSON status endpoint runs in a separate process on 127.0.0.1, so the
client's CPU time (process_time of this process) is all that is measured.

    .venv/bin/python bench/http_client_cpu.py [--requests 2000] [--concurrency 100] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

import aiohttp
import httpx
from aiohttp import web
from httpx_aiohttp import AiohttpTransport

from jobwatch.egress import EgressPolicy
from jobwatch.httpclient import HttpClient, Request
from jobwatch.outcome import Response

BODY = b'{"status": "RUNNING", "progress": 42, "message": "still working"}'


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


async def main(port: int, requests: int, concurrency: int) -> None:
    url = f"http://127.0.0.1:{port}/status"

    async with aiohttp.ClientSession() as session:

        async def raw() -> None:
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200

        await run("raw aiohttp", raw, requests, concurrency)

    async with httpx.AsyncClient(transport=AiohttpTransport()) as plain:

        async def httpx_aiohttp() -> None:
            response = await plain.get(url, headers={"Authorization": "Bearer token"})
            assert response.status_code == 200

        await run("httpx + AiohttpTransport", httpx_aiohttp, requests, concurrency)

    client = HttpClient(EgressPolicy())
    request = Request("GET", url, headers=(("Authorization", "Bearer token"),), timeout=30)

    async def jobwatch() -> None:
        outcome = await client.send(request)
        assert isinstance(outcome, Response) and outcome.code == 200, outcome

    try:
        await run("jobwatch HttpClient", jobwatch, requests, concurrency)
    finally:
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args()

    receiver, sender = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(sender,), daemon=True)
    server.start()
    try:
        server_port: int = receiver.recv()
        if args.uvloop:
            import uvloop

            uvloop.run(main(server_port, args.requests, args.concurrency))
        else:
            asyncio.run(main(server_port, args.requests, args.concurrency))
    finally:
        server.terminate()
        server.join()
