"""The HTTP client against real servers on loopback.

Network rule for these tests: traffic goes to 127.0.0.0/8 only. Denied-destination
tests point at loopback servers (bound on 127.0.0.2 where the test needs to prove
that nothing arrived), never at a real link-local or outside address; names other
than `localhost` are answered by a fake resolver, so no DNS query leaves the host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import shutil
import socket
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from jobwatch.core.outcome import FailureKind, RequestFailure, Response
from jobwatch.jobservice import client as httpclient
from jobwatch.jobservice.client import HttpClient, Request, TLSSettings
from jobwatch.jobservice.egress import EgressPolicy, GuardedResolver, parse_networks
from loopback import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    host: str
    port: int
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    runners: list[web.AppRunner] = []

    async def start(
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Server:
        server = Server(host, 0)

        async def record(request: web.Request) -> web.StreamResponse:
            server.seen.append(
                Seen(
                    request.method,
                    request.path_qs,
                    {k.lower(): v for k, v in request.headers.items()},
                    await request.read(),
                )
            )
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        server.port = runner.addresses[0][1]
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


MakeClient = Callable[..., HttpClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[HttpClient] = []

    def make(policy: EgressPolicy | None = None, **options: Any) -> HttpClient:
        client = HttpClient(policy or EgressPolicy(), **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "COMPLETED"})


def get(url: str, **fields: Any) -> Request:
    return Request(method=fields.pop("method", "GET"), url=url, **{"timeout": 5.0, **fields})


def expect_response(outcome: Response | RequestFailure) -> Response:
    assert isinstance(outcome, Response), outcome
    return outcome


def expect_failure(outcome: Response | RequestFailure, kind: FailureKind) -> RequestFailure:
    assert isinstance(outcome, RequestFailure), outcome
    assert outcome.kind is kind, outcome
    return outcome


# --- plain exchanges --------------------------------------------------------------


async def test_get_returns_code_body_and_lower_cased_headers(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"status": "COMPLETED"}, status=202)
        response.headers["X-Job-State"] = "done"
        response.headers.add("X-Multi", "a")
        response.headers.add("X-Multi", "b")
        return response

    server = await start_server(handler)
    response = expect_response(await make_client().send(get(server.url("/jobs/42"))))

    assert response.code == 202
    assert response.body == {"status": "COMPLETED"}
    assert response.headers["x-job-state"] == "done"
    assert response.headers["x-multi"] == "a, b"
    assert all(name == name.lower() for name in response.headers)
    assert response.latency_ms >= 0
    assert server.seen[0].path == "/jobs/42"
    assert server.seen[0].headers["user-agent"] == "jobwatch"


async def test_post_sends_body_and_headers(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(ok)
    request = get(
        server.url("/submit"),
        method="POST",
        headers=(("Content-Type", "application/json"), ("X-Token", "t0k3n\n")),
        body=b'{"a": 1}',
    )
    expect_response(await make_client().send(request))

    seen = server.seen[0]
    assert (seen.method, seen.body) == ("POST", b'{"a": 1}')
    assert seen.headers["content-type"] == "application/json"
    # The trailing newline a Secret made from a file usually carries is not sent.
    assert seen.headers["x-token"] == "t0k3n"


def test_request_repr_leaves_out_header_values_and_body() -> None:
    request = Request(
        "POST", "http://status.test/", headers=(("Authorization", "Bearer s3cret"),), body=b"s3cret"
    )
    assert "s3cret" not in repr(request)


async def test_head_has_no_body(start_server: StartServer, make_client: MakeClient) -> None:
    server = await start_server(ok)
    response = expect_response(await make_client().send(get(server.url(), method="HEAD")))
    assert response.code == 200
    assert response.text == ""
    assert server.seen[0].method == "HEAD"


async def test_credentials_in_the_url_become_basic_auth_and_stay_out_of_messages(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(ok)
    client = make_client()
    expect_response(await client.send(get(f"http://user:s3cret@127.0.0.1:{server.port}/")))
    expected = "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert server.seen[0].headers["authorization"] == expected

    failure = expect_failure(
        await client.send(get(f"http://user:s3cret@127.0.0.1:{free_port()}/")),
        FailureKind.TRANSPORT,
    )
    assert "s3cret" not in failure.message
    assert "user" not in failure.message


async def test_cookies_are_not_carried_between_requests(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.set_cookie("session", "abc")
        return response

    server = await start_server(handler)
    client = make_client()
    expect_response(await client.send(get(server.url("/one"))))
    expect_response(await client.send(get(server.url("/two"))))
    assert "cookie" not in server.seen[1].headers


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\x00b", "caf\u00e9"])
async def test_unsendable_header_value_is_a_failure_without_the_value(
    start_server: StartServer, make_client: MakeClient, value: str
) -> None:
    server = await start_server(ok)
    failure = expect_failure(
        await make_client().send(get(server.url(), headers=(("X-Api-Key", value),))),
        FailureKind.TRANSPORT,
    )
    assert "'X-Api-Key'" in failure.message
    assert value not in failure.message
    assert server.seen == []


async def test_invalid_header_name(make_client: MakeClient) -> None:
    failure = expect_failure(
        await make_client().send(get("http://127.0.0.1:1/", headers=(("Bad Name", "x"),))),
        FailureKind.TRANSPORT,
    )
    assert failure.message == "invalid request header name 'Bad Name'"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://127.0.0.1/", "unsupported URL scheme 'ftp'"),
        ("http:///path", "invalid URL: no host"),
        ("http://127.0.0.1:99999/", "invalid URL: Port out of range 0-65535"),
    ],
)
async def test_unusable_url(make_client: MakeClient, url: str, message: str) -> None:
    failure = expect_failure(await make_client().send(get(url)), FailureKind.TRANSPORT)
    assert failure.message == message


# --- transport failures -----------------------------------------------------------


async def test_connection_refused(make_client: MakeClient) -> None:
    port = free_port()
    failure = expect_failure(
        await make_client().send(get(f"http://127.0.0.1:{port}/")), FailureKind.TRANSPORT
    )
    assert failure.message == f"connection refused by 127.0.0.1:{port}"
    assert not failure.timed_out  # the time did not run out: no deadline can have cut it


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(5)
    return web.Response(text="late")


async def test_timeout_covers_the_whole_attempt(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(slow)
    failure = expect_failure(
        await make_client().send(get(server.url(), timeout=0.3)), FailureKind.TRANSPORT
    )
    assert failure.message == "request timed out after 300ms"
    assert failure.timed_out
    assert 250 <= failure.latency_ms < 2000


async def test_timeout_spans_redirect_hops(
    start_server: StartServer, make_client: MakeClient
) -> None:
    # Each hop alone is well within the timeout; together they are not.
    async def slow_hops(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.25)
        hop = int(request.match_info["tail"] or 0)
        raise web.HTTPFound(f"/{hop + 1}")

    server = await start_server(slow_hops)
    failure = expect_failure(
        await make_client().send(get(server.url(), timeout=1)), FailureKind.TRANSPORT
    )
    assert failure.message == "request timed out after 1s"
    assert failure.timed_out
    assert len(server.seen) <= 5


async def test_timeout_while_reading_the_body(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(50):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    server = await start_server(trickle)
    failure = expect_failure(
        await make_client().send(get(server.url(), timeout=0.5)), FailureKind.TRANSPORT
    )
    assert failure.message == "request timed out after 500ms"
    assert failure.timed_out


async def test_cancellation_propagates(start_server: StartServer, make_client: MakeClient) -> None:
    server = await start_server(slow)
    task = asyncio.create_task(make_client().send(get(server.url())))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_server_closing_without_response(make_client: MakeClient) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        failure = expect_failure(
            await make_client().send(get(f"http://127.0.0.1:{port}/")), FailureKind.TRANSPORT
        )
    assert failure.message == f"127.0.0.1:{port} closed the connection unexpectedly"


async def test_garbage_instead_of_http_is_an_invalid_response(make_client: MakeClient) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        failure = expect_failure(
            await make_client().send(get(f"http://127.0.0.1:{port}/")),
            FailureKind.INVALID_RESPONSE,
        )
    # What the parser choked on is not quoted: it is the endpoint's to choose.
    assert failure.message == f"invalid HTTP response from 127.0.0.1:{port}: Bad status line"


# --- egress guard -----------------------------------------------------------------

LOOPBACK = "127.0.0.0/8, ::1/128"


async def test_name_resolving_to_a_denied_address_is_refused_before_connecting(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(ok)
    client = make_client(EgressPolicy(deny=parse_networks(LOOPBACK)))

    failure = expect_failure(
        await client.send(get(server.url(host="localhost"))), FailureKind.EGRESS_DENIED
    )
    # Whichever of localhost's addresses (127.0.0.1, maybe ::1) comes first.
    assert failure.message.startswith("egress denied for localhost: ")
    assert "127.0.0.1 is in the denied range 127.0.0.0/8" in failure.message
    assert server.seen == []


async def test_name_resolving_to_an_allowed_address_is_fetched(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(ok)
    expect_response(await make_client().send(get(server.url(host="localhost"))))
    assert len(server.seen) == 1


async def test_denied_ip_literal_is_refused_before_connecting(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(ok, host="127.0.0.2")
    # The same server is reachable when the policy allows it.
    expect_response(await make_client().send(get(server.url())))
    server.seen.clear()

    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.2/32")))
    failure = expect_failure(await client.send(get(server.url())), FailureKind.EGRESS_DENIED)
    assert failure.message == "egress denied: 127.0.0.2 is in the denied range 127.0.0.2/32"
    assert server.seen == []


@pytest.mark.parametrize("host", ["2130706433", "127.1", "[::ffff:127.0.0.2]"])
async def test_other_spellings_of_a_denied_literal_are_refused(
    start_server: StartServer, make_client: MakeClient, host: str
) -> None:
    server = await start_server(ok, host="127.0.0.2")
    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.2/32")))
    expect_failure(
        await client.send(get(f"http://{host}:{server.port}/")), FailureKind.EGRESS_DENIED
    )
    assert server.seen == []


class ScriptedResolver(AbstractResolver):
    """Answers every name with fixed addresses, the way a rebinding DNS server could."""

    answers: ClassVar[list[str]] = []
    lookups: ClassVar[int] = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        type(self).lookups += 1
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def scripted_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[ScriptedResolver]]:
    def guarded(policy: EgressPolicy) -> GuardedResolver:
        return GuardedResolver(policy, inner=ScriptedResolver())

    monkeypatch.setattr(httpclient, "GuardedResolver", guarded)
    ScriptedResolver.answers = []
    ScriptedResolver.lookups = 0
    yield ScriptedResolver


async def test_connection_goes_only_to_the_checked_addresses(
    start_server: StartServer, make_client: MakeClient, scripted_dns: type[ScriptedResolver]
) -> None:
    # Two servers on one port number: the address the client picks decides which is hit.
    denied = await start_server(ok, host="127.0.0.2")
    allowed = await start_server(ok, host="127.0.0.1", port=denied.port)
    scripted_dns.answers = ["127.0.0.2", "127.0.0.1"]

    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.2/32")))
    for _ in range(3):
        expect_response(await client.send(get(f"http://rebind.test:{denied.port}/")))
    assert denied.seen == []
    assert len(allowed.seen) == 3


async def test_dns_failure(
    make_client: MakeClient, scripted_dns: type[ScriptedResolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(
        self: ScriptedResolver, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[ResolveResult]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(scripted_dns, "resolve", fail)
    failure = expect_failure(
        await make_client().send(get("http://nowhere.test/")), FailureKind.TRANSPORT
    )
    assert failure.message == "DNS lookup failed for nowhere.test (Name or service not known)"


async def test_denial_is_rechecked_on_every_resolution(
    start_server: StartServer, make_client: MakeClient, scripted_dns: type[ScriptedResolver]
) -> None:
    server = await start_server(ok, host="127.0.0.2")
    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.2/32")))
    scripted_dns.answers = ["127.0.0.2"]
    for _ in range(2):
        expect_failure(
            await client.send(get(f"http://denied.test:{server.port}/")),
            FailureKind.EGRESS_DENIED,
        )
    # A refusal is not cached as an answer: the second attempt asked again.
    assert scripted_dns.lookups == 2
    assert server.seen == []


# --- redirects --------------------------------------------------------------------


def redirect_to(location: str, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler


async def test_redirect_to_a_denied_address_is_refused(
    start_server: StartServer, make_client: MakeClient
) -> None:
    target = await start_server(ok, host="127.0.0.2")
    origin = await start_server(redirect_to(target.url("/secret")))
    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.2/32")))

    failure = expect_failure(await client.send(get(origin.url())), FailureKind.EGRESS_DENIED)
    assert failure.message == (
        "egress denied: 127.0.0.2 is in the denied range 127.0.0.2/32 (after 1 redirect)"
    )
    assert len(origin.seen) == 1
    assert target.seen == []


async def test_redirect_to_a_name_that_resolves_to_a_denied_address_is_refused(
    start_server: StartServer, make_client: MakeClient
) -> None:
    target = await start_server(ok)
    origin = await start_server(redirect_to(target.url(host="localhost")), host="127.0.0.2")
    client = make_client(EgressPolicy(deny=parse_networks("127.0.0.1/32, ::1/128")))

    failure = expect_failure(await client.send(get(origin.url())), FailureKind.EGRESS_DENIED)
    assert failure.message.startswith("egress denied for localhost:")
    assert target.seen == []


async def chain(request: web.Request) -> web.StreamResponse:
    """`/hops/N` redirects N times before answering."""
    left = int(request.match_info["tail"].removeprefix("hops/"))
    if left == 0:
        return web.Response(text="arrived")
    raise web.HTTPFound(f"/hops/{left - 1}")


async def test_five_redirects_are_followed(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(chain)
    response = expect_response(await make_client().send(get(server.url("/hops/5"))))
    assert (response.code, response.text) == (200, "arrived")
    assert len(server.seen) == 6


async def test_six_redirects_are_too_many(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(chain)
    failure = expect_failure(
        await make_client().send(get(server.url("/hops/6"))), FailureKind.INVALID_RESPONSE
    )
    assert failure.message == "more than 5 redirects"
    assert len(server.seen) == 6


async def test_redirect_limit_is_configurable(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(chain)
    client = make_client(max_redirects=2)
    expect_response(await client.send(get(server.url("/hops/2"))))
    failure = expect_failure(
        await client.send(get(server.url("/hops/3"))), FailureKind.INVALID_RESPONSE
    )
    assert failure.message == "more than 2 redirects"


@pytest.mark.parametrize(
    ("status", "method", "expected_method", "body_kept"),
    [
        (301, "POST", "GET", False),
        (302, "POST", "GET", False),
        (302, "PUT", "GET", False),
        (303, "POST", "GET", False),
        (303, "PUT", "GET", False),
        (303, "GET", "GET", False),
        (303, "HEAD", "HEAD", False),
        (301, "HEAD", "HEAD", False),
        (302, "GET", "GET", False),
        (307, "POST", "POST", True),
        (307, "PUT", "PUT", True),
        (308, "POST", "POST", True),
        (308, "PUT", "PUT", True),
    ],
)
async def test_redirect_method_rules(
    *,
    start_server: StartServer,
    make_client: MakeClient,
    status: int,
    method: str,
    expected_method: str,
    body_kept: bool,
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/start":
            return web.Response(status=status, headers={"Location": "/next"})
        return web.Response(text="done")

    server = await start_server(handler)
    body = b"payload" if method in ("POST", "PUT") else None
    request = get(
        server.url("/start"),
        method=method,
        body=body,
        headers=(("Content-Type", "text/plain"),) if body else (),
    )
    expect_response(await make_client().send(request))

    final = server.seen[-1]
    assert (final.path, final.method) == ("/next", expected_method)
    if body_kept:
        assert final.body == b"payload"
        assert final.headers["content-type"] == "text/plain"
    else:
        assert final.body == b""
        assert "content-type" not in final.headers


SECRET_HEADERS = (
    ("Authorization", "Bearer secret-token"),
    ("Cookie", "session=secret"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("X-Api-Key", "secret-key"),
    ("X-Trace", "keep-me"),
)


async def test_cross_origin_redirect_drops_credentials(
    start_server: StartServer, make_client: MakeClient
) -> None:
    target = await start_server(ok)
    origin = await start_server(redirect_to(target.url("/landing")))
    request = get(origin.url(), headers=SECRET_HEADERS, sensitive_headers=frozenset({"x-api-key"}))
    expect_response(await make_client().send(request))

    assert origin.seen[0].headers["x-api-key"] == "secret-key"
    landed = target.seen[0].headers
    for name in ("authorization", "cookie", "proxy-authorization", "x-api-key"):
        assert name not in landed
    assert landed["x-trace"] == "keep-me"


async def test_same_origin_redirect_keeps_headers(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/start":
            raise web.HTTPFound("/landing")
        return web.Response(text="ok")

    server = await start_server(handler)
    request = get(
        server.url("/start"), headers=SECRET_HEADERS, sensitive_headers=frozenset({"x-api-key"})
    )
    expect_response(await make_client().send(request))

    landed = server.seen[1].headers
    assert landed["authorization"] == "Bearer secret-token"
    assert landed["x-api-key"] == "secret-key"


async def test_credentials_stay_dropped_when_redirected_back(
    start_server: StartServer, make_client: MakeClient
) -> None:
    origin_box: list[Server] = []

    async def back(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(origin_box[0].url("/final"))

    bouncer = await start_server(back)

    async def origin_handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/start":
            raise web.HTTPFound(bouncer.url())
        return web.Response(text="ok")

    origin = await start_server(origin_handler)
    origin_box.append(origin)
    expect_response(await make_client().send(get(origin.url("/start"), headers=SECRET_HEADERS)))
    assert "authorization" not in origin.seen[-1].headers


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("ftp://127.0.0.1/file", "redirect to unsupported scheme 'ftp'"),
        ("file:///etc/passwd", "redirect to unsupported scheme 'file'"),
        ("x" * 5000 + ":rest", f"redirect to unsupported scheme '{'x' * 23}…'"),
        ("http://127.0.0.1:notaport/", "redirect to an invalid location"),
    ],
)
async def test_bad_redirect_location(
    start_server: StartServer, make_client: MakeClient, location: str, message: str
) -> None:
    server = await start_server(redirect_to(location))
    failure = expect_failure(
        await make_client().send(get(server.url())), FailureKind.INVALID_RESPONSE
    )
    assert failure.message == message


async def test_redirect_status_without_location_is_the_response(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, text="nowhere to go")

    server = await start_server(handler)
    response = expect_response(await make_client().send(get(server.url())))
    assert (response.code, response.text) == (302, "nowhere to go")


# --- body cap ---------------------------------------------------------------------


def body_of(size: int, chunked: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=b"a" * size)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, size, 300):
            await response.write(b"a" * min(300, size - start))
        await response.write_eof()
        return response

    return handler


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_exactly_at_the_cap_is_read(
    start_server: StartServer, make_client: MakeClient, chunked: bool
) -> None:
    server = await start_server(body_of(1000, chunked))
    response = expect_response(await make_client(max_body_bytes=1000).send(get(server.url())))
    assert len(response.text) == 1000


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_one_byte_over_the_cap_is_refused(
    start_server: StartServer, make_client: MakeClient, chunked: bool
) -> None:
    server = await start_server(body_of(1001, chunked))
    failure = expect_failure(
        await make_client(max_body_bytes=1000).send(get(server.url())),
        FailureKind.INVALID_RESPONSE,
    )
    assert failure.message == "response body exceeds 1000 bytes"


async def test_default_cap_is_one_mebibyte(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = await start_server(body_of(1024 * 1024 + 1, chunked=True))
    failure = expect_failure(
        await make_client().send(get(server.url())), FailureKind.INVALID_RESPONSE
    )
    assert failure.message == "response body exceeds 1 MiB"


async def test_gzip_body_is_decoded(start_server: StartServer, make_client: MakeClient) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(b'{"status": "COMPLETED"}'), headers={"Content-Encoding": "gzip"}
        )

    server = await start_server(handler)
    response = expect_response(await make_client().send(get(server.url())))
    assert response.body == {"status": "COMPLETED"}
    assert server.seen[0].headers["accept-encoding"] == "gzip, deflate"


async def test_compressed_body_is_capped_on_its_decoded_size(
    start_server: StartServer, make_client: MakeClient
) -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB in about 64 KiB

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    server = await start_server(handler)
    failure = expect_failure(
        await make_client().send(get(server.url())), FailureKind.INVALID_RESPONSE
    )
    assert failure.message == "response body exceeds 1 MiB"


# --- response bodies as they come off the wire ------------------------------------

RawServe = Callable[..., Awaitable[str]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServe]:
    """A server that answers every request with exactly the bytes it is given: a head,
    then each body piece written (and drained) on its own, as a network delivers them."""
    servers: list[asyncio.Server] = []

    async def serve(head: bytes, *pieces: bytes) -> str:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head)
                for piece in pieces:
                    await writer.drain()
                    writer.write(piece)
                await writer.drain()
                await reader.read()  # until the client hangs up
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


def chunked(*pieces: bytes) -> list[bytes]:
    """`pieces` in HTTP/1.1 chunked framing, one chunk each, and the last-chunk."""
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def head(code: int = 200, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {code} X", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def test_header_names_are_lower_case_and_repeats_joined(
    raw_server: RawServe, make_client: MakeClient
) -> None:
    url = await raw_server(
        head(200, "X-Mixed-Case: v", "Via: a", "Via: b", "Content-Length: 2"), b"{}"
    )
    response = expect_response(await make_client().send(get(url)))
    assert response.headers["x-mixed-case"] == "v"
    assert response.headers["via"] == "a, b"
    assert response.body == {}


async def test_invalid_utf8_is_replaced(raw_server: RawServe, make_client: MakeClient) -> None:
    url = await raw_server(
        head(200, "Transfer-Encoding: chunked"), *chunked(b"ok \xff", b"\xfe done")
    )
    response = expect_response(await make_client().send(get(url)))
    assert response.text == "ok \ufffd\ufffd done"
    assert response.body is None


@pytest.mark.parametrize(
    "payload",
    [
        zlib.compress(b'{"n": 1}'),  # RFC "deflate": zlib-wrapped
        zlib.compress(b'{"n": 1}')[2:-4],  # what many servers send: raw deflate
    ],
)
async def test_deflate_in_both_wire_forms(
    raw_server: RawServe, make_client: MakeClient, payload: bytes
) -> None:
    url = await raw_server(
        head(200, "Content-Encoding: deflate", "Transfer-Encoding: chunked"),
        *chunked(payload[:3], payload[3:]),
    )
    response = expect_response(await make_client().send(get(url)))
    assert response.body == {"n": 1}


@pytest.mark.parametrize(
    ("encoding", "content", "message"),
    [
        ("br", b"\x1b\x00", "unsupported content-encoding 'br'"),
        ("x" * 5000, b"{}", f"unsupported content-encoding '{'x' * 23}…'"),
        ("gzip", b"not gzip at all", "response body is not valid gzip data"),
    ],
)
async def test_undecodable_body(
    raw_server: RawServe, make_client: MakeClient, encoding: str, content: bytes, message: str
) -> None:
    url = await raw_server(
        head(200, f"Content-Encoding: {encoding}", f"Content-Length: {len(content)}"), content
    )
    failure = expect_failure(await make_client().send(get(url)), FailureKind.INVALID_RESPONSE)
    assert failure.message == message


async def test_unknown_encoding_on_an_empty_body_is_fine(
    raw_server: RawServe, make_client: MakeClient
) -> None:
    url = await raw_server(head(204, "Content-Encoding: br"))
    response = expect_response(await make_client().send(get(url, method="HEAD")))
    assert response.code == 204


async def test_declared_length_over_the_cap_is_refused_unread(
    raw_server: RawServe, make_client: MakeClient
) -> None:
    # Ten bytes of the two million declared: reading would wait for the rest.
    url = await raw_server(head(200, "Content-Length: 2000000"), b"x" * 10)
    failure = expect_failure(await make_client().send(get(url)), FailureKind.INVALID_RESPONSE)
    assert failure.message == "response body exceeds 1 MiB"


# --- shared clients and TLS -------------------------------------------------------


@pytest.fixture
def created_clients(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every aiohttp session the client creates, in order."""
    created: list[aiohttp.ClientSession] = []

    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)
        created.append(session)
        return session

    monkeypatch.setattr(httpclient.aiohttp, "ClientSession", recording)
    return created


async def test_one_client_per_tls_setting(
    start_server: StartServer, make_client: MakeClient, created_clients: list[aiohttp.ClientSession]
) -> None:
    server = await start_server(ok)
    client = make_client()
    insecure = TLSSettings(insecure_skip_verify=True)

    for _ in range(3):
        expect_response(await client.send(get(server.url())))
    assert len(created_clients) == 1
    for _ in range(3):
        expect_response(await client.send(get(server.url(), tls=insecure)))
        expect_response(await client.send(get(server.url(), tls=TLSSettings())))
    assert len(created_clients) == 2
    assert not any(c.closed for c in created_clients)


async def test_least_recently_used_tls_client_is_evicted_and_closed(
    start_server: StartServer, make_client: MakeClient, created_clients: list[aiohttp.ClientSession]
) -> None:
    server = await start_server(ok)
    client = make_client(max_tls_clients=2)
    # Distinct settings without needing certificates: with verification off the
    # CA bundle is never read.
    a, b, c = (TLSSettings(insecure_skip_verify=True, ca_pem=name) for name in "abc")

    for tls in (a, b, a, c):  # c evicts b, the least recently used
        expect_response(await client.send(get(server.url(), tls=tls)))
    await asyncio.sleep(0)  # the eviction closes the client in a task
    await asyncio.sleep(0)
    client_a, client_b, client_c = created_clients
    assert client_b.closed
    assert not client_a.closed and not client_c.closed

    expect_response(await client.send(get(server.url(), tls=b)))
    assert len(created_clients) == 4


async def test_default_client_is_never_evicted(
    start_server: StartServer, make_client: MakeClient, created_clients: list[aiohttp.ClientSession]
) -> None:
    server = await start_server(ok)
    client = make_client(max_tls_clients=1)
    expect_response(await client.send(get(server.url())))
    for name in "abc":
        tls = TLSSettings(insecure_skip_verify=True, ca_pem=name)
        expect_response(await client.send(get(server.url(), tls=tls)))
    expect_response(await client.send(get(server.url())))
    assert not created_clients[0].closed
    assert len(created_clients) == 4


async def test_evicted_client_finishes_its_requests_first(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(text="slow but fine")

    server = await start_server(slow)
    client = make_client(max_tls_clients=1)
    a, b = (TLSSettings(insecure_skip_verify=True, ca_pem=name) for name in "ab")
    in_flight = asyncio.create_task(client.send(get(server.url(), tls=a)))
    await asyncio.sleep(0.1)
    expect_response(await client.send(get(server.url(), tls=b)))  # evicts a
    response = expect_response(await in_flight)
    assert response.text == "slow but fine"


@dataclass
class Certificate:
    pem: str
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key_file), "-out", str(cert_file),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Certificate(cert_file.read_text(), cert_file, key_file)


@pytest.fixture
async def tls_server(start_server: StartServer, certificate: Certificate) -> Server:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert_file, certificate.key_file)
    server: Server = await start_server(ok, ssl_context=context)
    return server


def https(server: Server) -> str:
    return f"https://127.0.0.1:{server.port}/"


async def test_untrusted_certificate_is_a_transport_failure(
    tls_server: Server, make_client: MakeClient
) -> None:
    failure = expect_failure(
        await make_client().send(get(https(tls_server))), FailureKind.TRANSPORT
    )
    assert failure.message.startswith("TLS certificate verification failed: self-signed")


async def test_ca_bundle_makes_the_certificate_trusted(
    tls_server: Server, make_client: MakeClient, certificate: Certificate
) -> None:
    tls = TLSSettings(ca_pem=certificate.pem)
    response = expect_response(await make_client().send(get(https(tls_server), tls=tls)))
    assert response.body == {"status": "COMPLETED"}


async def test_insecure_skip_verify(tls_server: Server, make_client: MakeClient) -> None:
    tls = TLSSettings(insecure_skip_verify=True)
    expect_response(await make_client().send(get(https(tls_server), tls=tls)))


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("", "the CA bundle is empty"),
        ("not a certificate", "the CA bundle is not valid PEM"),
        (
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            "the CA bundle is not valid PEM",
        ),
    ],
)
async def test_bad_ca_bundle_is_a_failure(make_client: MakeClient, pem: str, message: str) -> None:
    failure = expect_failure(
        await make_client().send(get("https://127.0.0.1:1/", tls=TLSSettings(ca_pem=pem))),
        FailureKind.TRANSPORT,
    )
    assert failure.message.startswith(message)


async def test_tls_to_a_plain_port(start_server: StartServer, make_client: MakeClient) -> None:
    server = await start_server(ok)
    failure = expect_failure(
        await make_client().send(get(f"https://127.0.0.1:{server.port}/")), FailureKind.TRANSPORT
    )
    assert failure.message.startswith(f"TLS handshake with 127.0.0.1:{server.port} failed")


# --- what a failure says about the URL's own host ---------------------------------------
# A host's circuit breaker (jobwatch.jobservice.hosts) counts only failures of the first hop itself:
# a watch's own unusable setting or a redirect target's fault must not open it.


async def test_a_refused_connection_and_a_timeout_are_the_hosts(
    start_server: StartServer, make_client: MakeClient
) -> None:
    client = make_client()
    refused = await client.send(get(f"http://127.0.0.1:{free_port()}/"))
    assert expect_failure(refused, FailureKind.TRANSPORT).host_failed
    server = await start_server(slow)
    timed_out = await client.send(get(server.url(), timeout=0.2))
    assert expect_failure(timed_out, FailureKind.TRANSPORT).host_failed


async def test_the_watchs_own_settings_say_nothing_of_the_host(
    tls_server: Server, make_client: MakeClient
) -> None:
    client = make_client()
    outcomes = [
        await client.send(get(https(tls_server))),  # not trusted by the watch's CA bundle
        await client.send(get(https(tls_server), tls=TLSSettings(ca_pem="not a certificate"))),
        await client.send(get(https(tls_server), headers=(("X-Key", "a\nb"),))),
    ]
    for outcome in outcomes:
        assert not expect_failure(outcome, FailureKind.TRANSPORT).host_failed, outcome


async def test_what_happens_after_a_redirect_is_not_the_first_hosts(
    start_server: StartServer, make_client: MakeClient
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.Response(status=503)

    target = await start_server(failing)
    dead = f"http://127.0.0.1:{free_port()}/"

    async def moving(request: web.Request) -> web.StreamResponse:
        where = {"/dead": dead, "/slow": target.url("/slow")}.get(request.path, target.url())
        return await redirect_to(where)(request)

    moved = await start_server(moving)
    client = make_client()
    refused = await client.send(get(moved.url("/dead")))
    assert not expect_failure(refused, FailureKind.TRANSPORT).host_failed
    timed_out = await client.send(get(moved.url("/slow"), timeout=0.3))
    assert not expect_failure(timed_out, FailureKind.TRANSPORT).host_failed
    answered = expect_response(await client.send(get(moved.url())))
    assert (answered.code, answered.redirects) == (503, 1)
    direct = expect_response(await client.send(get(target.url())))
    assert (direct.code, direct.redirects) == (503, 0)
