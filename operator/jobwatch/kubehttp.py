"""The HTTP/1.1 connections the API client (kube.py) speaks through.

Small on purpose. A status write is a few hundred bytes to one server we trust to speak
HTTP/1.1 properly, and a general-purpose client's machinery was much of what a write
cost. Here a request is written and its answer parsed on an `asyncio.Protocol`, with no
stream reader and no task or timer per read: a third of aiohttp's CPU per request at
2,000 requests a second (0.08 against 0.22 ms, `bench/http_client_cpu.py`), and a status
write with its echo 1.7 ms instead of 2.2 at 18 a second (`bench/status_writes.py`).

What it does:

- a pool of keep-alive connections (plain or TLS), at most `max_connections` at once;
- requests with a body of known length; answers with Content-Length, chunked, or ended
  by the server closing the connection;
- answers read whole, or streamed (the watch) with reading paused while more than
  `STREAM_BUFFER` bytes wait for the reader;
- a timeout for connecting and one for the silence between two reads;
- a proxy by CONNECT (a kubeconfig's `proxy-url`, or `HTTPS_PROXY`/`HTTP_PROXY` when
  the environment is trusted, `NO_PROXY` honoured).

Not here: redirects, compression, cookies, pipelining: the API server uses none with us.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast

# A head larger than this is not an API server's: the connection is dropped.
MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 1024
# What a streamed answer buffers before reading from the socket pauses.
STREAM_BUFFER = 1024 * 1024


class Unreachable(Exception):
    """No (whole) answer: not connected, the connection broke, or it timed out."""


class _Protocol(Exception):
    """The server's bytes are not HTTP/1.1 as we speak it."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go, and how."""

    scheme: str
    host: str
    port: int
    base: str  # the server URL's path, without a trailing slash: paths are appended
    tls: ssl.SSLContext | None
    proxy: tuple[str, int, str | None] | None  # host, port, Proxy-Authorization

    @classmethod
    def parse(
        cls, server: str, context: ssl.SSLContext | None, proxy: str | None, trust_env: bool
    ) -> Origin:
        url = urllib.parse.urlsplit(server)
        host = url.hostname or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        if proxy is None and trust_env:
            proxy = _proxy_from_env(url.scheme, host)
        return cls(
            url.scheme,
            host,
            port,
            url.path.rstrip("/"),
            context if url.scheme == "https" else None,
            _parse_proxy(proxy) if proxy else None,
        )

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _proxy_from_env(scheme: str, host: str) -> str | None:
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies_environment().get(scheme)


def basic_auth(user: str, password: str) -> str:
    """An Authorization (or Proxy-Authorization) header value for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _parse_proxy(proxy: str) -> tuple[str, int, str | None]:
    url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if url.scheme != "http":
        raise ValueError(f"proxy {url.scheme}://{url.hostname}: only http:// proxies are supported")
    auth = None
    if url.username is not None:
        user = urllib.parse.unquote(url.username)
        password = urllib.parse.unquote(url.password or "")
        auth = basic_auth(user, password)
    return url.hostname or "", url.port or 80, auth


class _Answer:
    """One answer, parsed as its bytes arrive: the head, then the body."""

    __slots__ = (
        "_buffer",
        "_chunk_left",
        "_conn",
        "_length",
        "_stage",
        "_waiter",
        "body",
        "error",
        "finished",
        "keep_alive",
        "started",
        "status",
        "timed_out",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._buffer = bytearray()  # unparsed bytes
        self.body = bytearray()  # body bytes not yet taken by the reader
        self.status = 0
        self.keep_alive = True
        self._stage = "head"  # head, length, chunk-size, chunk, chunk-end, trailer, close
        self._length = 0
        self._chunk_left = 0
        self.finished = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.started = False  # any byte of it arrived
        self.timed_out = False

    def feed(self, data: bytes) -> None:
        if self.finished:
            raise _Protocol("bytes after the end of the answer")
        self.started = True
        self._buffer += data
        self._parse()
        if len(self.body) > STREAM_BUFFER:
            self._conn.pause()
        self._wake()

    def feed_eof(self, why: str = "the API server closed the connection") -> None:
        if self._stage == "close":
            self.finished, self.keep_alive = True, False
        elif not self.finished and self.error is None:
            self.error = Unreachable(why)
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.finished and self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Until something more arrived, or the answer ended."""
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    @property
    def pending(self) -> bool:
        """Bytes past the answer's end: the connection cannot be used again."""
        return bool(self._buffer)

    @property
    def has_head(self) -> bool:
        return self._stage != "head"

    def take(self) -> bytes:
        data = bytes(self.body)
        self.body.clear()
        self._conn.resume()
        return data

    def _parse(self) -> None:
        buffer = self._buffer
        while buffer and not self.finished:
            stage = self._stage
            if stage == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise _Protocol("answer head too large")
                    return
                self._head(bytes(buffer[:end]))
                del buffer[: end + 4]
            elif stage in ("length", "chunk"):
                left = self._length if stage == "length" else self._chunk_left
                taken = buffer[:left]
                self.body += taken
                del buffer[: len(taken)]
                left -= len(taken)
                if stage == "length":
                    self._length = left
                    self.finished = left == 0
                else:
                    self._chunk_left = left
                    if left == 0:
                        self._stage = "chunk-end"
            elif stage == "close":
                self.body += buffer
                buffer.clear()
            else:  # chunk-size, chunk-end, trailer: one line each
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise _Protocol("chunk line too long")
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                self._line(stage, line)

    def _line(self, stage: str, line: bytes) -> None:
        if stage == "chunk-end":
            if line:
                raise _Protocol("no CRLF after a chunk")
            self._stage = "chunk-size"
        elif stage == "chunk-size":
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _Protocol("bad chunk size") from None
            if size < 0:
                raise _Protocol("bad chunk size")
            self._chunk_left = size
            self._stage = "chunk" if size else "trailer"
        elif not line:  # the empty line that ends the trailers
            self.finished = True

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _Protocol("not an HTTP/1.x status line")
        self.status = int(parts[1])
        if 100 <= self.status < 200:
            return  # an interim answer: the real head follows
        length: int | None = None
        chunked = False
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit() or len(value.strip()) > 18:
                    raise _Protocol("bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                self.keep_alive = b"close" not in value.lower()
        if self.status in (204, 304):
            length = 0
        if chunked:
            self._stage = "chunk-size"
        elif length is not None:
            self._stage, self._length = "length", length
            self.finished = length == 0
        else:
            self._stage, self.keep_alive = "close", False


class _Connection(asyncio.Protocol):
    """One connection; one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.lost = False
        self.paused = False
        # Read by the timeout check: when bytes last came.
        self.heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is a Transport in all but its class.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.heard = asyncio.get_running_loop().time()
        answer = self.answer
        if answer is None:
            self.close()  # nothing was asked: the server is confused, or closing
            return
        try:
            answer.feed(data)
        except _Protocol as exc:
            answer.fail(Unreachable(f"bad answer from the API server: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        if self.answer is not None:
            self.answer.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.answer is not None:
            # A TLS server may close without a close_notify: an answer read to the
            # connection's end then ends here, not in eof_received.
            self.answer.feed_eof(f"connection lost: {exc or 'closed'}")

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            self.heard = asyncio.get_running_loop().time()
            self.transport.resume_reading()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    def __init__(
        self,
        origin: Origin,
        headers: Mapping[str, str],
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._origin = origin
        fixed = {"host": origin.authority, **headers}
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._all: set[_Connection] = set()

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    async def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one request; `target` is the path with its query."""
        async with self._exchange(method, target, body, content_type, self._read_timeout) as ans:
            parts = [ans.take()]
            while not ans.finished:
                await ans.wait()
                parts.append(ans.take())
            return ans.status, b"".join(parts)

    @contextlib.asynccontextmanager
    async def stream(
        self, target: str, read_timeout: float
    ) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """A GET whose answer is read as it comes: (status, its body's pieces)."""
        async with self._exchange("GET", target, None, None, read_timeout) as answer:
            yield answer.status, self._pieces(answer)

    @staticmethod
    async def _pieces(answer: _Answer) -> AsyncIterator[bytes]:
        while True:
            if answer.body:
                yield answer.take()
            elif answer.finished:
                return
            else:
                await answer.wait()

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        method: str,
        target: str,
        body: bytes | None,
        content_type: str | None,
        read_timeout: float,
    ) -> AsyncIterator[_Answer]:
        """Sends the request and yields its answer once its head is in; the connection
        goes back to the pool if the answer was read to its end and may be kept."""
        head = f"{method} {self._origin.base}{target} HTTP/1.1\r\n{self._headers}"
        if body is not None:
            head += f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        request = head.encode("latin-1") + b"\r\n" + (body or b"")
        async with self._slots:
            conn, answer, watchdog = await self._send(request, read_timeout)
            try:
                yield answer
            except BaseException:
                conn.close()
                raise
            finally:
                watchdog.cancel()
                self._put_back(conn, answer)

    async def _send(
        self, request: bytes, read_timeout: float
    ) -> tuple[_Connection, _Answer, _Watchdog]:
        """The request sent and its answer's head in. A kept-alive connection the server
        closed meanwhile fails before any byte of an answer: the request is then sent
        once more on a new connection, as Go's client does."""
        loop = asyncio.get_running_loop()
        while True:
            conn, reused = await self._connection()
            answer = conn.answer = _Answer(conn)
            watchdog = _Watchdog(loop, conn, read_timeout)
            try:
                assert conn.transport is not None
                conn.heard = loop.time()
                conn.transport.write(request)
                while not answer.has_head:
                    await answer.wait()
                return conn, answer, watchdog
            except Unreachable:
                watchdog.cancel()
                self._put_back(conn, answer)
                # A silent server may have the request: only a closed one has not.
                if not reused or answer.started or answer.timed_out:
                    raise
            except BaseException:
                watchdog.cancel()
                conn.close()
                self._put_back(conn, answer)
                raise

    def _put_back(self, conn: _Connection, answer: _Answer) -> None:
        conn.answer = None
        if answer.finished and answer.keep_alive and not conn.lost and not answer.pending:
            self._idle.append(conn)
        else:
            conn.close()
            self._all.discard(conn)

    async def _connection(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was used before."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost:
                return conn, True
            self._all.discard(conn)
        origin = self._origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if origin.proxy is None:
                    _, conn = await loop.create_connection(
                        _Connection,
                        origin.host,
                        origin.port,
                        ssl=origin.tls,
                        server_hostname=origin.host if origin.tls else None,
                    )
                else:
                    conn = await self._tunnel(loop, origin, origin.proxy)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise Unreachable(f"cannot connect: {type(exc).__name__}: {exc}") from exc
        self._all.add(conn)
        return conn, False

    @staticmethod
    async def _tunnel(
        loop: asyncio.AbstractEventLoop, origin: Origin, proxy: tuple[str, int, str | None]
    ) -> _Connection:
        host, port, auth = proxy
        _, conn = await loop.create_connection(_Connection, host, port)
        answer = conn.answer = _Answer(conn)
        target = f"[{origin.host}]" if ":" in origin.host else origin.host
        target = f"{target}:{origin.port}"
        request = f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n"
        if auth:
            request += f"proxy-authorization: {auth}\r\n"
        assert conn.transport is not None
        try:  # a timeout (the connect budget) cancels this: the socket must not leak
            conn.transport.write(request.encode("latin-1") + b"\r\n")
            while not answer.has_head:
                await answer.wait()
            conn.answer = None
            if answer.status != 200:
                raise OSError(f"proxy {host}:{port} refused the tunnel: HTTP {answer.status}")
            if origin.tls is not None:
                transport = await loop.start_tls(
                    conn.transport, conn, origin.tls, server_hostname=origin.host
                )
                conn.transport = cast(asyncio.Transport, transport)
        except BaseException:
            conn.close()
            raise
        return conn


class _Watchdog:
    """Fails the answer when nothing arrived for `timeout` seconds. One timer, moved
    on only when it fires: not one timer per read."""

    __slots__ = ("_conn", "_handle", "_loop", "_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: _Connection, timeout: float) -> None:
        self._loop, self._conn, self._timeout = loop, conn, timeout
        self._handle = loop.call_later(timeout, self._check)

    def _check(self) -> None:
        if self._conn.paused:  # our reader is behind, not the server silent
            self._handle = self._loop.call_later(self._timeout, self._check)
            return
        due = self._conn.heard + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        answer = self._conn.answer
        if answer is not None:
            answer.timed_out = True
            answer.fail(Unreachable(f"no answer for {self._timeout:g} s"))
        self._conn.close()

    def cancel(self) -> None:
        self._handle.cancel()
