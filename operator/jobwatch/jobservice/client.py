"""The shared HTTP client: one attempt in, one `Outcome` out.

Requests go straight to aiohttp's client, with its connection pool; URLs are parsed
(once per distinct URL) and joined with yarl, the URL type aiohttp takes. One exchange
costs less than half the CPU of one through httpx's client API on the same pool
(docs/benchmarks.md), and at thousands of polls a second that is most of the
operator's CPU. There is one aiohttp session per
distinct `TLSSettings`, kept in a small LRU; the default settings have their own
session that is never evicted.

Every failure to get a usable response becomes a `RequestFailure`: nothing but
cancellation escapes `send`. Messages go to status, events and logs, so they never
carry request header values, URL credentials or query strings.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import logging
import re
import ssl
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import httpx
from aiohttp.http_exceptions import LineTooLong
from yarl import URL

from jobwatch.core.outcome import FailureKind, Outcome, RequestFailure, Response
from jobwatch.jobservice.egress import EgressDeniedError, EgressPolicy, GuardedResolver

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# The bounds of the client's caches of parsed URLs and checked request headers.
MAX_PARSED_URLS = 16384
MAX_PREPARED_HEADERS = 4096

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_ALWAYS_SENSITIVE = frozenset({"authorization", "cookie", "proxy-authorization"})
# Headers that describe the request body: wrong once a redirect drops the body.
_BODY_HEADERS = frozenset(
    {"content-type", "content-length", "content-encoding", "transfer-encoding"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Only what `_Inflater` can decode within the body cap; httpx's own decoders would
# inflate a whole network chunk at once (a 16 KiB gzip bomb chunk is 16 MiB).
_DEFAULT_HEADERS = {"user-agent": "jobwatch", "accept-encoding": "gzip, deflate"}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Where an aiohttp parser error message starts quoting the bytes it choked on
# ("Invalid HTTP header: b'...'", "Bad status line '...'").
_QUOTING = re.compile(r"[:'\"\n]")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """How to verify servers. `ca_pem` replaces the public roots; skipping
    verification makes it moot."""

    insecure_skip_verify: bool = False
    ca_pem: str | None = field(default=None, repr=False)


_DEFAULT_TLS = TLSSettings()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    # Values may come from Secrets: kept out of repr so that logging a Request is safe.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    sensitive_headers: frozenset[str] = frozenset()  # lower-case names valued from Secrets
    body: bytes | None = field(default=None, repr=False)
    timeout: float = 30.0  # seconds, for the whole attempt: connect, redirects and body
    tls: TLSSettings = _DEFAULT_TLS


class _Failed(Exception):
    def __init__(self, kind: FailureKind, message: str, *, host_failed: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.host_failed = host_failed  # see RequestFailure.host_failed


@dataclass(slots=True)
class _Progress:
    hop: int = 0  # redirects followed so far


@dataclass(slots=True, eq=False)
class _Slot:
    session: aiohttp.ClientSession
    in_use: int = 0
    evicted: bool = False


class HttpClient:
    """Sends `Request`s with the egress guard, redirects, body cap and timeout.

    Create and use it inside one running event loop; `aclose` it on shutdown.
    `max_connections` caps the open connections of each TLS setting's pool.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        max_body_bytes: int = MiB,
        max_redirects: int = 5,
        max_connections: int = 100,
        max_tls_clients: int = 32,
    ) -> None:
        self._policy = policy
        self._max_body_bytes = max_body_bytes
        self._max_redirects = max_redirects
        self._max_connections = max_connections
        self._max_tls_clients = max_tls_clients
        # Created with the first client: aiohttp's resolver needs the running loop.
        self._resolver: GuardedResolver | None = None
        self._default: _Slot | None = None
        self._slots: OrderedDict[TLSSettings, _Slot] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        # Each watch polls the same URL with the same headers again and again: both are
        # checked once. Header values from Secrets change only when the Secret does.
        self._parse_url = functools.lru_cache(maxsize=MAX_PARSED_URLS)(_parse_url)
        self._prepared_headers = functools.lru_cache(maxsize=MAX_PREPARED_HEADERS)(
            _prepared_headers
        )

    async def send(self, request: Request) -> Outcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = asyncio.timeout(request.timeout)
        progress = _Progress()
        try:
            async with budget:
                return await self._attempt(request, started, progress)
        except _Failed as failure:
            # Anything that broke because the budget ran out is reported as the timeout.
            if not budget.expired():
                return RequestFailure(
                    failure.kind,
                    failure.message,
                    _elapsed_ms(loop, started),
                    host_failed=failure.host_failed,
                )
        except TimeoutError:
            if not budget.expired():
                raise
        message = f"request timed out after {_seconds(request.timeout)}"
        return RequestFailure(
            FailureKind.TRANSPORT,
            message,
            _elapsed_ms(loop, started),
            host_failed=progress.hop == 0,
            timed_out=True,
        )

    async def aclose(self) -> None:
        slots = [*self._slots.values()]
        if self._default is not None:
            slots.append(self._default)
        self._default = None
        self._slots.clear()
        for slot in slots:
            await slot.session.close()
        if self._closing:
            await asyncio.gather(*self._closing)
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def _attempt(self, request: Request, started: float, progress: _Progress) -> Response:
        url, headers = _credentials_as_header(
            self._parse_url(request.url), self._prepared_headers(request.headers)
        )
        method = request.method.upper()
        body = request.body

        slot = self._acquire(request.tls)
        try:
            hop = 0
            while True:
                self._check(url, hop)
                try:
                    async with slot.session.request(
                        method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                    ) as response:
                        code = response.status
                        location = response.headers.get("location")
                        if code not in _REDIRECT_CODES or location is None:
                            return await self._response(response, started, hop)
                except _Failed:
                    raise
                except Exception as exc:
                    raise _classify(exc, url, hop) from None

                if hop == self._max_redirects:
                    raise _Failed(
                        FailureKind.INVALID_RESPONSE, f"more than {self._max_redirects} redirects"
                    )
                target = _redirect_target(url, location)
                new_method = _redirected_method(code, method)
                if new_method != method:
                    method, body = new_method, None
                    headers = tuple((n, v) for n, v in headers if n.lower() not in _BODY_HEADERS)
                if _origin(target) != _origin(url):
                    headers = _without_sensitive(headers, request.sensitive_headers)
                url = target
                hop += 1
                progress.hop = hop
        finally:
            self._release(slot)

    async def _response(
        self, response: aiohttp.ClientResponse, started: float, hop: int
    ) -> Response:
        content = await self._read_body(response)
        return Response(
            code=response.status,
            headers=_joined_headers(response.headers),
            text=content.decode("utf-8", errors="replace"),
            latency_ms=_elapsed_ms(asyncio.get_running_loop(), started),
            redirects=hop,
        )

    def _check(self, url: URL, hop: int) -> None:
        """Whether the egress policy allows the URL's host, if an IP literal (the
        resolver checks names)."""
        reason = self._policy.check_literal(url.raw_host or "")
        if reason is not None:
            raise _Failed(FailureKind.EGRESS_DENIED, f"egress denied: {reason}{_after(hop)}")

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        cap = self._max_body_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _too_big(cap)
        encoding = response.headers.get("content-encoding")
        inflater: _Inflater | None = None
        parts: list[bytes] = []
        raw_size = size = 0
        async for chunk in response.content.iter_any():
            # Checked on the wire too, so junk after a compressed stream's end is bounded.
            raw_size += len(chunk)
            if raw_size > cap:
                raise _too_big(cap)
            data = chunk
            if encoding is not None:
                if inflater is None:
                    inflater = _Inflater.for_encoding(encoding)
                data = inflater.feed(chunk, cap - size)
            size += len(data)
            if size > cap:
                raise _too_big(cap)
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _acquire(self, tls: TLSSettings) -> _Slot:
        if tls == _DEFAULT_TLS:
            if self._default is None:
                self._default = self._new_slot(tls)
            slot = self._default
        else:
            found = self._slots.get(tls)
            if found is None:
                slot = self._slots[tls] = self._new_slot(tls)
                while len(self._slots) > self._max_tls_clients:
                    _, old = self._slots.popitem(last=False)
                    old.evicted = True
                    self._close_if_idle(old)
            else:
                slot = found
                self._slots.move_to_end(tls)
        slot.in_use += 1
        return slot

    def _release(self, slot: _Slot) -> None:
        slot.in_use -= 1
        self._close_if_idle(slot)

    def _close_if_idle(self, slot: _Slot) -> None:
        # An evicted client may still carry other watches' requests: close it only
        # once the last of them is done.
        if slot.evicted and slot.in_use == 0:
            task = asyncio.get_running_loop().create_task(slot.session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _new_slot(self, tls: TLSSettings) -> _Slot:
        context = _ssl_context(tls)
        if self._resolver is None:
            self._resolver = GuardedResolver(self._policy)
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            ssl=context,
            resolver=self._resolver,
            # The resolver caches by record TTL; aiohttp's own cache would keep answers a
            # fixed 10 s on top of that.
            use_dns_cache=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # A shared jar would carry one watch's cookies into another's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            # No timer of aiohttp's own: `send` bounds the whole attempt.
            timeout=aiohttp.ClientTimeout(),
        )
        return _Slot(session)


def _ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    if tls.insecure_skip_verify:
        return httpx.create_ssl_context(verify=False)
    if tls.ca_pem is None:
        return httpx.create_ssl_context(verify=True, trust_env=True)
    if not tls.ca_pem.strip():
        # An empty cadata would make ssl fall back to the system roots.
        raise _Failed(FailureKind.TRANSPORT, "the CA bundle is empty")
    try:
        return ssl.create_default_context(cadata=tls.ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))
        raise _Failed(FailureKind.TRANSPORT, f"the CA bundle is not valid PEM ({reason})") from None


class _Inflater:
    """gzip/deflate decoding that never produces more than the caller allows."""

    def __init__(self, encoding: str | None) -> None:
        self._encoding = encoding
        self._gzip = encoding == "gzip"
        wbits = zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS
        self._zlib = None if encoding is None else zlib.decompressobj(wbits)
        self._started = False

    @classmethod
    def for_encoding(cls, header: str | None) -> _Inflater:
        codings = [c.strip().lower() for c in (header or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if not codings:
            return cls(None)
        if codings in (["gzip"], ["x-gzip"]):
            return cls("gzip")
        if codings == ["deflate"]:
            return cls("deflate")
        raise _Failed(
            FailureKind.INVALID_RESPONSE, f"unsupported content-encoding {_quoted(header or '')}"
        )

    def feed(self, data: bytes, limit: int) -> bytes:
        """Decoded bytes of `data`; more than `limit` of them means over the cap.

        With max_length = limit + 1, output shorter than that means all input was
        consumed, so nothing is left pending inside zlib.
        """
        if self._zlib is None:
            return data
        try:
            try:
                out = self._zlib.decompress(data, limit + 1)
            except zlib.error:
                # "deflate" in the wild is often raw deflate without the zlib header.
                if self._gzip or self._started:
                    raise
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                out = self._zlib.decompress(data, limit + 1)
        except zlib.error:
            raise _Failed(
                FailureKind.INVALID_RESPONSE, f"response body is not valid {self._encoding} data"
            ) from None
        self._started = True
        return out


def _parse_url(text: str) -> URL:
    try:
        url = URL(text)
    except (ValueError, TypeError) as exc:  # UnicodeError (IDNA) is a ValueError
        raise _Failed(FailureKind.TRANSPORT, f"invalid URL: {exc}") from None
    if url.scheme not in _DEFAULT_PORTS:
        raise _Failed(FailureKind.TRANSPORT, f"unsupported URL scheme {url.scheme!r}")
    if not url.raw_host:
        raise _Failed(FailureKind.TRANSPORT, "invalid URL: no host")
    return url


def _prepared_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The request's headers, checked, after jobwatch's defaults it does not override."""
    checked: list[tuple[str, str]] = []
    for name, raw in headers:
        if not _TOKEN.fullmatch(name):
            raise _Failed(FailureKind.TRANSPORT, f"invalid request header name {name!r}")
        # Surrounding whitespace is not part of a field value (RFC 9110), and a
        # trailing newline is the usual accident in a Secret made from a file.
        value = raw.strip()
        if _CONTROL.search(value) or not value.isascii():
            # Transient, not fatal: the Secret it came from can still be fixed.
            raise _Failed(
                FailureKind.TRANSPORT,
                f"request header {name!r} has a value with a line break, control or "
                "non-ASCII character",
            )
        checked.append((name, value))
    given = {name.lower() for name, _ in checked}
    defaults = [(n, v) for n, v in _DEFAULT_HEADERS.items() if n not in given]
    return (*defaults, *checked)


def _credentials_as_header(
    url: URL, headers: tuple[tuple[str, str], ...]
) -> tuple[URL, tuple[tuple[str, str], ...]]:
    """Credentials in the URL become Basic authorization, unless the request has its own."""
    if url.user is None and url.password is None:
        return url, headers
    if not any(name.lower() == "authorization" for name, _ in headers):
        credentials = f"{url.user or ''}:{url.password or ''}".encode()
        auth = "Basic " + base64.b64encode(credentials).decode()
        headers = (*headers, ("authorization", auth))
    return url.with_user(None), headers


def _without_sensitive(
    headers: tuple[tuple[str, str], ...], sensitive_headers: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """What may follow a redirect to another origin."""
    sensitive = _ALWAYS_SENSITIVE | sensitive_headers
    return tuple((n, v) for n, v in headers if n.lower() not in sensitive and n.lower() != "host")


def _redirect_target(current: URL, location: str) -> URL:
    try:
        target = current.join(URL(location))
    except (ValueError, TypeError):
        raise _Failed(FailureKind.INVALID_RESPONSE, "redirect to an invalid location") from None
    if target.scheme not in _DEFAULT_PORTS:
        raise _Failed(
            FailureKind.INVALID_RESPONSE, f"redirect to unsupported scheme {_quoted(target.scheme)}"
        )
    if not target.raw_host:
        raise _Failed(FailureKind.INVALID_RESPONSE, "redirect to a location without a host")
    # Credentials in a Location header are the server's to offer, not ours to send.
    if target.user is not None or target.password is not None:
        return target.with_user(None)
    return target


def _redirected_method(code: int, method: str) -> str:
    if method == "HEAD":
        return method
    if code == 303 or (code in (301, 302) and method in ("POST", "PUT")):
        return "GET"
    return method


def _origin(url: URL) -> tuple[str, str, int]:
    return url.scheme, url.raw_host or "", url.port or _DEFAULT_PORTS[url.scheme]


def _host_port(url: URL) -> str:
    host = url.host or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{url.port or _DEFAULT_PORTS[url.scheme]}"


def _joined_headers(headers: Mapping[str, str]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in headers.items():  # every value of a repeated name
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_E = TypeVar("_E", bound=BaseException)


def _find(causes: list[BaseException], kind: type[_E]) -> _E | None:
    return next((c for c in causes if isinstance(c, kind)), None)


def _find_ssl(causes: list[BaseException], kind: type[_E]) -> _E | None:
    # aiohttp's TLS errors subclass the ssl ones without their attributes;
    # the original from the ssl module sits further down the chain.
    return next(
        (c for c in causes if isinstance(c, kind) and not isinstance(c, aiohttp.ClientError)),
        None,
    )


def _classify(exc: Exception, url: URL, hop: int) -> _Failed:
    """A short, header-free message for what went wrong talking to `url`."""
    causes = list(_chain(exc))
    where = _host_port(url)
    after = _after(hop)
    failed = _connect_failure(causes, url, where, after, hop == 0) or _exchange_failure(
        causes, where, after, hop == 0
    )
    if failed is not None:
        return failed
    # Unknown: keep the watch going as a transient error, and leave a trace for us.
    # Header values were validated before sending, so the exception cannot echo one.
    log.error("unexpected error requesting %s", where, exc_info=exc)
    return _Failed(
        FailureKind.TRANSPORT, f"request to {where} failed ({type(exc).__name__}){after}"
    )


def _connect_failure(
    causes: list[BaseException], url: URL, where: str, after: str, first_hop: bool
) -> _Failed | None:
    """Egress, DNS, TLS and connection failures: no HTTP exchange took place."""
    if (denied := _find(causes, EgressDeniedError)) is not None:
        return _Failed(FailureKind.EGRESS_DENIED, f"{denied}{after}")
    if (dns := _find(causes, aiohttp.ClientConnectorDNSError)) is not None:
        detail = dns.os_error.strerror or str(dns.os_error)
        return _Failed(
            FailureKind.TRANSPORT,
            f"DNS lookup failed for {url.host} ({detail}){after}",
            host_failed=first_hop,
        )
    if (cert := _find_ssl(causes, ssl.SSLCertVerificationError)) is not None:
        detail = cert.verify_message or cert.reason or "unknown reason"
        return _Failed(
            FailureKind.TRANSPORT, f"TLS certificate verification failed: {detail} ({where}){after}"
        )
    if (tls := _find_ssl(causes, ssl.SSLError)) is not None:
        detail = tls.reason or tls.strerror or "unknown reason"
        return _Failed(
            FailureKind.TRANSPORT,
            f"TLS handshake with {where} failed: {detail}{after}",
            host_failed=first_hop,
        )
    if (connect := _find(causes, aiohttp.ClientConnectorError)) is not None:
        code = connect.os_error.errno
        if code == errno.ECONNREFUSED:
            message = f"connection refused by {where}"
        elif code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            message = f"{where} is unreachable"
        else:
            detail = connect.os_error.strerror or str(connect.os_error)
            message = f"cannot connect to {where}: {detail}"
        return _Failed(FailureKind.TRANSPORT, message + after, host_failed=first_hop)
    return None


def _exchange_failure(
    causes: list[BaseException], where: str, after: str, first_hop: bool
) -> _Failed | None:
    """Failures of a connected exchange: the connection dropped, a bad answer."""
    if _find(causes, aiohttp.ServerDisconnectedError) is not None:
        return _Failed(
            FailureKind.TRANSPORT,
            f"{where} closed the connection unexpectedly{after}",
            host_failed=first_hop,
        )
    if _find(causes, aiohttp.ClientPayloadError) is not None:
        return _Failed(
            FailureKind.TRANSPORT,
            f"incomplete response body from {where}{after}",
            host_failed=first_hop,
        )
    if (bad := _find(causes, aiohttp.ClientResponseError)) is not None:
        if (long_line := _find(causes, LineTooLong)) is not None:
            detail = f"a line of its head is longer than {long_line.args[1]} bytes"
        else:
            # The parser's description; what follows it quotes the endpoint's bytes.
            detail = _QUOTING.split(bad.message, maxsplit=1)[0].strip()[:120] or "malformed"
        return _Failed(
            FailureKind.INVALID_RESPONSE, f"invalid HTTP response from {where}: {detail}{after}"
        )
    if (os_error := _find(causes, OSError)) is not None:
        detail = os_error.strerror or str(os_error)
        return _Failed(
            FailureKind.TRANSPORT,
            f"connection to {where} failed: {detail}{after}",
            host_failed=first_hop,
        )
    return None


def _quoted(value: str, limit: int = 24) -> str:
    """A value the endpoint sent, quoted for a message, cut to `limit` characters."""
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def _too_big(cap: int) -> _Failed:
    return _Failed(FailureKind.INVALID_RESPONSE, f"response body exceeds {_size(cap)}")


def _after(hop: int) -> str:
    if not hop:
        return ""
    return f" (after {hop} redirect{'s' if hop > 1 else ''})"


def _elapsed_ms(loop: asyncio.AbstractEventLoop, started: float) -> int:
    return round((loop.time() - started) * 1000)


def _seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _size(n: int) -> str:
    for unit, factor in (("MiB", MiB), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"
