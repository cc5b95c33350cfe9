"""kubehttp.Pool against loopback servers that send bytes each test chose, so that
framing edge cases, broken connections, silence and proxies happen on demand.

kube.py's use of the pool (auth, status codes, the watch's lines) is in test_kube.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import pytest

from jobwatch import kubehttp

WAIT = 5.0  # the longest any wait on state may take
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNKED = (
    STREAM_HEAD + b"5;name=value\r\nhello\r\n"
    b'2 ; quoted="a;b"\r\n, \r\n'
    b"A\r\n0123456789\r\n"
    b"0\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n"
)
CHUNKED_BODY = b"hello, 0123456789"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.005)


@dataclass(frozen=True)
class Request:
    number: int  # in the order the server read them, from 0
    conn: int  # the connection it came on, in the order accepted, from 0
    line: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """The next request's line, headers and body; None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *fields = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for field in fields:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return line, headers, body


class Delivered:
    """Bytes handed to the client's connections so far (see the `delivered` fixture)."""

    def __init__(self) -> None:
        self.count = self.calls = 0
        self._more = asyncio.Event()

    def add(self, data: bytes) -> None:
        self.count += len(data)
        self.calls += 1
        self._more.set()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.count < count:
                self._more.clear()
                await self._more.wait()


@pytest.fixture
def delivered(monkeypatch: pytest.MonkeyPatch) -> Delivered:
    """Counts what reached kubehttp's protocol, so that a server can wait until one piece
    was parsed before it sends the next: TCP would otherwise merge the pieces."""
    seen = Delivered()
    original = kubehttp._Connection.data_received

    def counting(self: kubehttp._Connection, data: bytes) -> None:
        original(self, data)
        seen.add(data)

    monkeypatch.setattr(kubehttp._Connection, "data_received", counting)
    return seen


class Peer:
    """The server's end of one connection."""

    def __init__(self, server: Server, writer: asyncio.StreamWriter) -> None:
        self.server, self.writer = server, writer

    async def send(self, *pieces: bytes) -> None:
        """Each piece written on its own: with `delivered`, each parsed before the next."""
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            self.server.sent += len(piece)
            if self.server.delivered is not None and len(pieces) > 1:
                await self.server.delivered.reach(self.server.sent)

    def close(self) -> None:
        self.writer.close()


async def until_eof(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


Serve = Callable[[Peer, Request, asyncio.StreamReader], Awaitable[None]]


def replies(*answers: bytes, close: bool = False) -> Serve:
    """Answers the nth request with the nth answer (the last one repeats); with `close`,
    then closes the connection."""

    async def serve(peer: Peer, request: Request, _: asyncio.StreamReader) -> None:
        await peer.send(answers[min(request.number, len(answers) - 1)])
        if close:
            peer.close()

    return serve


async def hang(_: Peer, __: Request, reader: asyncio.StreamReader) -> None:
    """Never answers: waits until the client gives up."""
    await until_eof(reader)


class Listener:
    """A loopback TCP server; counts connections, cancels its handlers on exit."""

    def __init__(self) -> None:
        self.accepted = self.open = self.most_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = self.accepted
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handle(number, reader, writer)
        except ConnectionError:
            pass  # the client hung up: what some tests want
        except asyncio.CancelledError:
            pass  # by __aexit__; re-raised, asyncio's stream callback would log it
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def handle(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError


class Server(Listener):
    """An HTTP server whose answers are `serve`'s bytes; records every request."""

    def __init__(self, serve: Serve, delivered: Delivered | None = None) -> None:
        super().__init__()
        self.serve, self.delivered = serve, delivered
        self.requests: list[Request] = []
        self.sent = 0

    async def handle(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = Peer(self, writer)
        while not writer.is_closing() and (got := await read_request(reader)) is not None:
            request = Request(len(self.requests), number, *got)
            self.requests.append(request)
            await self.serve(peer, request, reader)


class Proxy(Listener):
    """A CONNECT proxy: records each CONNECT, answers `answer` (None: never), and after
    a 200 splices bytes both ways to the target."""

    def __init__(self, answer: bytes | None = ESTABLISHED) -> None:
        super().__init__()
        self.answer = answer
        self.connects: list[tuple[str, dict[str, str]]] = []
        self.client_left = asyncio.Event()

    async def handle(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        got = await read_request(reader)
        assert got is not None
        line, headers, _ = got
        self.connects.append((line, headers))
        if self.answer is None:
            await until_eof(reader)
            self.client_left.set()
            return
        writer.write(self.answer)
        if not self.answer.startswith(b"HTTP/1.1 200 "):
            return
        host, port = line.split()[1].rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        try:
            await asyncio.gather(splice(reader, up_writer), splice(up_reader, writer))
        finally:
            up_writer.close()


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def pool_for(
    url: str,
    *,
    proxy: str | None = None,
    trust_env: bool = False,
    max_connections: int = 4,
    connect_timeout: float = WAIT,
    read_timeout: float = WAIT,
) -> AsyncIterator[kubehttp.Pool]:
    origin = kubehttp.Origin.parse(url, None, proxy, trust_env)
    pool = kubehttp.Pool(
        origin,
        {"accept": "application/json"},
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    try:
        yield pool
    finally:
        await pool.aclose()


@contextlib.asynccontextmanager
async def serving(
    serve: Serve,
    *,
    path: str = "",
    delivered: Delivered | None = None,
    max_connections: int = 4,
    read_timeout: float = WAIT,
) -> AsyncIterator[tuple[Server, kubehttp.Pool]]:
    async with (
        Server(serve, delivered) as server,
        pool_for(
            f"http://127.0.0.1:{server.port}{path}",
            max_connections=max_connections,
            read_timeout=read_timeout,
        ) as pool,
    ):
        yield server, pool


async def get(pool: kubehttp.Pool, path: str = "/api") -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        return await pool.request("GET", path)


# -- framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "close", "status", "body", "reused"),
    [
        pytest.param(OK, False, 200, b"ok", True, id="content-length"),
        pytest.param(CHUNKED, False, 200, CHUNKED_BODY, True, id="chunked"),
        pytest.param(CONTINUE + OK, False, 200, b"ok", True, id="100-continue"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", False, 204, b"", True, id="204"),
        pytest.param(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\n\r\n",
            False,
            304,
            b"",
            True,
            id="304-has-no-body",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n\r\nto the end", True, 200, b"to the end", False, id="until-close"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok",
            False,
            200,
            b"ok",
            False,
            id="connection-close",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", False, 200, b"ok", False, id="1.0"
        ),
        pytest.param(OK, True, 200, b"ok", False, id="server-closes-when-idle"),
        pytest.param(OK + b"HTTP/1.1", False, 200, b"ok", False, id="bytes-after-the-end"),
    ],
)
async def test_answer_framing(
    answer: bytes, close: bool, status: int, body: bytes, reused: bool
) -> None:
    async with serving(replies(answer, close=close)) as (server, pool):
        assert await get(pool) == (status, body)
        assert await get(pool) == (status, body)
    assert server.accepted == (1 if reused else 2)


SPLIT = [
    pytest.param(CONTINUE + CHUNKED, CHUNKED_BODY, id="continue-chunked"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, world",
        b"hello, world",
        id="content-length",
    ),
]


@pytest.mark.parametrize(("answer", "body"), SPLIT)
async def test_answer_arriving_byte_by_byte(
    delivered: Delivered, answer: bytes, body: bytes
) -> None:
    def serve(peer: Peer, _: Request, __: asyncio.StreamReader) -> Awaitable[None]:
        return peer.send(*(answer[i : i + 1] for i in range(len(answer))))

    async with serving(serve, delivered=delivered) as (server, pool):
        assert await get(pool) == (200, body)
        assert await get(pool) == (200, body)
    assert (server.accepted, delivered.calls) == (1, 2 * len(answer))


@pytest.mark.parametrize(("answer", "body"), SPLIT)
async def test_answer_split_in_two_at_every_offset(
    delivered: Delivered, answer: bytes, body: bytes
) -> None:
    def serve(peer: Peer, request: Request, _: asyncio.StreamReader) -> Awaitable[None]:
        cut = request.number + 1
        return peer.send(answer[:cut], answer[cut:])

    async with serving(serve, delivered=delivered) as (server, pool):
        results = [await get(pool) for _ in range(len(answer) - 1)]
    assert results == [(200, body)] * (len(answer) - 1)
    assert (server.accepted, delivered.calls) == (1, 2 * (len(answer) - 1))


# -- the request ---------------------------------------------------------------------


async def test_request_head_and_body() -> None:
    async with serving(replies(OK), path="/prefix/") as (server, pool):
        patch = b'{"status": {}}'
        target = "/apis/g/v1/namespaces/ns/things/a/status?fieldManager=jobwatch"
        assert await pool.request("PATCH", target, patch, "application/merge-patch+json") == (
            200,
            b"ok",
        )
        assert await get(pool, "/api/v1") == (200, b"ok")
    sent, got = server.requests
    assert sent.line == f"PATCH /prefix{target} HTTP/1.1"
    assert sent.headers["host"] == f"127.0.0.1:{server.port}"
    assert sent.headers["accept"] == "application/json"
    assert sent.headers["content-type"] == "application/merge-patch+json"
    assert sent.body == patch
    assert got.line == "GET /prefix/api/v1 HTTP/1.1"
    assert "content-length" not in got.headers
    assert got.body == b""


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("http://api.test", "api.test"),
        ("https://api.test:443/base", "api.test"),
        ("https://api.test:6443", "api.test:6443"),
        ("http://api.test:443", "api.test:443"),
        ("https://[::1]:6443", "[::1]:6443"),
    ],
)
def test_authority(url: str, authority: str) -> None:
    assert kubehttp.Origin.parse(url, None, None, trust_env=False).authority == authority


# -- connections ---------------------------------------------------------------------


async def test_at_most_max_connections_at_once() -> None:
    async def serve(peer: Peer, _: Request, __: asyncio.StreamReader) -> None:
        # Held until the pool opened all it may: a pool over its limit shows here.
        await until(lambda: peer.server.open >= 3)
        await peer.send(OK)

    async with serving(serve, max_connections=3) as (server, pool):
        results = await asyncio.gather(*(get(pool, f"/api/{i}") for i in range(20)))
    assert results == [(200, b"ok")] * 20
    assert (server.accepted, server.most_open) == (3, 3)


async def test_request_sent_again_when_a_kept_alive_connection_was_closed() -> None:
    async def serve(peer: Peer, request: Request, _: asyncio.StreamReader) -> None:
        if request.number == 1:
            peer.close()  # an idle timeout on the server's side, just as the request came
        else:
            await peer.send(OK)

    async with serving(serve) as (server, pool):
        for body in (b"1", b"2"):
            async with asyncio.timeout(WAIT):
                assert await pool.request("POST", "/api", body, "text/plain") == (200, b"ok")
    assert [(seen.conn, seen.body) for seen in server.requests] == [(0, b"1"), (0, b"2"), (1, b"2")]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(CONTINUE, id="after-100"),
        pytest.param(OK[:20], id="in-the-head"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", id="in-the-body"),
        pytest.param(CHUNKED[:70], id="in-a-chunk"),
    ],
)
async def test_answer_cut_midway_is_not_sent_again(cut: bytes) -> None:
    async def serve(peer: Peer, request: Request, _: asyncio.StreamReader) -> None:
        await peer.send(cut if request.number == 1 else OK)
        if request.number == 1:
            peer.close()

    async with serving(serve) as (server, pool):
        assert await get(pool) == (200, b"ok")
        with pytest.raises(kubehttp.Unreachable):
            await get(pool)
        assert len(server.requests) == 2
        assert await get(pool) == (200, b"ok")


async def test_a_cancelled_request_gives_its_slot_back() -> None:
    async def serve(peer: Peer, request: Request, reader: asyncio.StreamReader) -> None:
        await (hang(peer, request, reader) if request.number == 0 else peer.send(OK))

    async with serving(serve, max_connections=1) as (server, pool):
        slow = asyncio.create_task(get(pool))
        await until(lambda: len(server.requests) == 1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await get(pool) == (200, b"ok")
        await until(lambda: server.open == 1)  # the cancelled one's connection was closed
    assert server.accepted == 2


async def test_aclose_closes_every_connection() -> None:
    async with serving(replies(OK)) as (server, pool):
        await asyncio.gather(*(get(pool) for _ in range(3)))
        assert server.open > 0
        await pool.aclose()
        await until(lambda: server.open == 0)


# -- timeouts ------------------------------------------------------------------------


async def _silent_after_head(peer: Peer, request: Request, reader: asyncio.StreamReader) -> None:
    await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    await hang(peer, request, reader)


@pytest.mark.parametrize("serve", [hang, _silent_after_head], ids=["no-answer", "after-head"])
async def test_silence_times_out(serve: Serve) -> None:
    async with serving(serve, read_timeout=0.3) as (server, pool):
        started = time.monotonic()
        with pytest.raises(kubehttp.Unreachable, match=r"no answer for 0\.3 s"):
            await get(pool)
        assert 0.25 <= time.monotonic() - started < 1.5
        await until(lambda: server.open == 0)  # and its connection was closed


async def test_silence_on_a_kept_alive_connection_is_not_sent_again() -> None:
    async def serve(peer: Peer, request: Request, reader: asyncio.StreamReader) -> None:
        await (peer.send(OK) if request.number == 0 else hang(peer, request, reader))

    async with serving(serve, read_timeout=0.3) as (server, pool):
        assert await get(pool) == (200, b"ok")
        started = time.monotonic()
        with pytest.raises(kubehttp.Unreachable):
            await pool.request("POST", "/api/events", b"{}", "application/json")
        elapsed = time.monotonic() - started
    assert len(server.requests) == 2
    assert elapsed < 0.55


async def test_bytes_more_often_than_the_timeout_keep_an_answer_alive() -> None:
    body = b"trickled"

    async def serve(peer: Peer, _: Request, __: asyncio.StreamReader) -> None:
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        for byte in body:
            await asyncio.sleep(0.1)  # the pace under test, not a synchronisation
            await peer.send(bytes([byte]))

    async with serving(serve, read_timeout=0.3) as (_, pool):
        started = time.monotonic()
        assert await get(pool) == (200, body)
        assert time.monotonic() - started > 2 * 0.3


async def test_nothing_listening() -> None:
    with socket.socket() as held:  # bound, never listening: the port stays refused
        held.bind(("127.0.0.1", 0))
        async with pool_for(f"http://127.0.0.1:{held.getsockname()[1]}") as pool:
            with pytest.raises(kubehttp.Unreachable, match="cannot connect"):
                await get(pool)


# -- bad bytes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 OK\r\n\r\n", id="no-status-code"),
        pytest.param(STREAM_HEAD + b"zz\r\n", id="bad-chunk-size"),
        pytest.param(STREAM_HEAD + b"-5\r\n", id="negative-chunk-size"),
        pytest.param(STREAM_HEAD + b"2\r\nokXX\r\n", id="no-crlf-after-a-chunk"),
        pytest.param(STREAM_HEAD + b"1" * (kubehttp.MAX_CHUNK_LINE + 1), id="long-chunk-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: two\r\n\r\n", id="bad-content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n",
            id="content-length-too-long-for-int",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nx-padding: " + b"a" * kubehttp.MAX_HEAD, id="head-too-large"
        ),
    ],
)
async def test_bad_bytes(answer: bytes) -> None:
    async with serving(replies(answer, OK)) as (server, pool):
        with pytest.raises(kubehttp.Unreachable, match="bad answer"):
            await get(pool)
        assert await get(pool) == (200, b"ok")
    assert server.accepted == 2


# -- streams -------------------------------------------------------------------------


async def test_stream_pieces_arrive_as_they_are_sent() -> None:
    go = asyncio.Event()

    async def serve(peer: Peer, request: Request, _: asyncio.StreamReader) -> None:
        if "watch" not in request.line:
            await peer.send(OK)
            return
        await peer.send(STREAM_HEAD + chunk(b"first"))
        await go.wait()
        await peer.send(chunk(b"second") + chunk(b"third") + b"0\r\n\r\n")

    async with serving(serve) as (server, pool):
        async with asyncio.timeout(WAIT), pool.stream("/api?watch=1", WAIT) as (status, pieces):
            assert status == 200
            assert await anext(pieces) == b"first"
            go.set()
            assert b"".join([piece async for piece in pieces]) == b"secondthird"
        assert await get(pool) == (200, b"ok")
    assert server.accepted == 1  # a stream read to its end leaves its connection reusable


class Leave(Exception):
    pass


@pytest.mark.parametrize("by_raising", [False, True], ids=["return", "raise"])
async def test_leaving_a_stream_early_closes_its_connection(by_raising: bool) -> None:
    left = asyncio.Event()

    async def serve(peer: Peer, request: Request, reader: asyncio.StreamReader) -> None:
        if "watch" not in request.line:
            await peer.send(OK)
            return
        await peer.send(STREAM_HEAD + chunk(b"first"))
        await until_eof(reader)
        left.set()

    async with serving(serve) as (server, pool):
        with contextlib.suppress(Leave):
            async with pool.stream("/api?watch=1", WAIT) as (_, pieces):
                assert await anext(pieces) == b"first"
                if by_raising:
                    raise Leave
        async with asyncio.timeout(WAIT):
            await left.wait()
        assert await get(pool) == (200, b"ok")
    assert server.accepted == 2


FLOOD_PIECE = b"x" * 65536
FLOOD = 4 * kubehttp.STREAM_BUFFER // len(FLOOD_PIECE) * len(FLOOD_PIECE)


async def flood(peer: Peer, _: Request, __: asyncio.StreamReader) -> None:
    """A stream four times STREAM_BUFFER long, as fast as the client takes it."""
    pieces = [chunk(FLOOD_PIECE)] * (FLOOD // len(FLOOD_PIECE))
    await peer.send(STREAM_HEAD, *pieces, b"0\r\n\r\n")


async def read_flood_lagging(read_timeout: float, lag: float) -> int:
    """The bytes of `flood` read by a reader who, after the first piece, waits until
    reading paused and then `lag` seconds more."""
    async with (
        serving(flood) as (_, pool),
        asyncio.timeout(WAIT),
        pool.stream("/api?watch=1", read_timeout) as (_, pieces),
    ):
        received = len(await anext(pieces))
        # Pausing shows only on the transport, which the pool keeps to itself.
        (conn,) = pool._all
        transport = conn.transport
        assert transport is not None
        await until(lambda: not transport.is_reading())
        await asyncio.sleep(lag)  # the slow reader under test, not a synchronisation
        async for more in pieces:
            received += len(more)
    return received


async def test_stream_reading_pauses_while_the_reader_lags() -> None:
    assert await read_flood_lagging(WAIT, 0) == FLOOD


async def test_a_paused_stream_does_not_time_out() -> None:
    assert await read_flood_lagging(0.3, 0.6) == FLOOD


# -- proxies -------------------------------------------------------------------------


async def test_proxy_tunnels_with_connect() -> None:
    async with (
        Server(replies(OK)) as server,
        Proxy() as proxy,
        pool_for(
            f"http://127.0.0.1:{server.port}",
            proxy=f"http://us%40er:p%3Aw@127.0.0.1:{proxy.port}",
        ) as pool,
    ):
        assert await get(pool) == (200, b"ok")
        assert await get(pool) == (200, b"ok")
    ((line, headers),) = proxy.connects  # one tunnel, kept alive
    assert line == f"CONNECT 127.0.0.1:{server.port} HTTP/1.1"
    assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"us@er:p:w").decode()
    assert [seen.headers["host"] for seen in server.requests] == [f"127.0.0.1:{server.port}"] * 2


async def test_proxy_refusing_the_tunnel() -> None:
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
    async with (
        Proxy(refusal) as proxy,
        pool_for("http://127.0.0.1:1", proxy=f"http://127.0.0.1:{proxy.port}") as pool,
    ):
        with pytest.raises(kubehttp.Unreachable, match="407"):
            await get(pool)
    ((_, headers),) = proxy.connects
    assert "proxy-authorization" not in headers


async def test_silent_proxy_times_out_and_is_hung_up_on() -> None:
    async with (
        Proxy(None) as proxy,
        pool_for(
            "http://127.0.0.1:1", proxy=f"http://127.0.0.1:{proxy.port}", connect_timeout=0.3
        ) as pool,
    ):
        started = time.monotonic()
        with pytest.raises(kubehttp.Unreachable, match="cannot connect"):
            await get(pool)
        assert time.monotonic() - started < 1.5
        async with asyncio.timeout(1.0):
            await proxy.client_left.wait()


async def test_proxy_connect_target_for_an_ipv6_server() -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"
    async with (
        Proxy(refusal) as proxy,
        pool_for("http://[::1]:6443", proxy=f"http://127.0.0.1:{proxy.port}") as pool,
    ):
        with pytest.raises(kubehttp.Unreachable):
            await get(pool)
    ((line, headers),) = proxy.connects
    assert line == "CONNECT [::1]:6443 HTTP/1.1"
    assert headers["host"] == "[::1]:6443"


@pytest.mark.parametrize(
    ("no_proxy", "proxied"), [(None, True), ("api.test,127.0.0.1", False), ("*", False)]
)
async def test_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str | None, proxied: bool
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    async with Server(replies(OK)) as server, Proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        if no_proxy is not None:
            monkeypatch.setenv("NO_PROXY", no_proxy)
        async with pool_for(f"http://127.0.0.1:{server.port}", trust_env=True) as pool:
            assert await get(pool) == (200, b"ok")
    assert proxy.accepted == (1 if proxied else 0)
    assert len(proxy.connects) == (1 if proxied else 0)
