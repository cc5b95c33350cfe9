"""The endpoint fault catalogue (issue #8): what a broken or hostile endpoint can do to
one poll, each against a real server on 127.0.0.1 started by the test.

Every case goes through the real `HttpClient.send` and then `policy.decide`, and must
end in a classified outcome (a `RequestFailure` kind, a decision reason and a lastError
class) within `requestTimeout`, with bounded memory, with no request header value in
any message, and with everything the status would carry encodable for the API server.
The second half pins down `Response.body` on hostile JSON without a server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwatch.core import policy
from jobwatch.core.expressions import Cel, final_result
from jobwatch.core.outcome import MAX_JSON_DEPTH, FailureKind, Outcome, RequestFailure, Response
from jobwatch.core.policy import Decision, ErrorClass
from jobwatch.core.spec import parse_spec
from jobwatch.jobservice.client import HttpClient, MiB, Request, TLSSettings
from jobwatch.jobservice.egress import EgressPolicy

# Every request carries these, as a watch with a Secret-valued header would: no message
# may ever show them.
TOKEN = "s3cr3t-t0ken-Zq8"
REQUEST_HEADERS = (("authorization", f"Bearer {TOKEN}"), ("x-api-key", TOKEN))
SENSITIVE = frozenset({"x-api-key"})

REQUEST_TIMEOUT = 1.5  # seconds; the slow cases wait it out
SLACK = 1.0  # for a busy two-core CI machine
# Peak Python memory of one attempt, server included, with the 1 MiB body cap (at most
# 2.2 MiB measured). Without the cap: 6 MB for the 3 MB body, 148 MB for the bomb.
MEMORY_BOUND = 3 * MiB

DEFAULT_TLS = TLSSettings()

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a raw TCP (or TLS) server on 127.0.0.1 running `handler` for each
    connection; returns its port. Handlers still running at the end are cancelled."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> int:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
                writer.close()  # once all that the handler wrote is sent
                await writer.wait_closed()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass  # the client gave up on us: that is the point of most cases
            finally:
                writer.transport.abort()
                handlers.discard(task)

        server = await asyncio.start_server(run, "127.0.0.1", 0, ssl=ssl_context)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(EgressPolicy())
    yield http
    await http.aclose()


@dataclass
class Poll:
    outcome: Outcome
    decision: Decision
    elapsed: float

    def failure(self, kind: FailureKind) -> RequestFailure:
        assert isinstance(self.outcome, RequestFailure), self.outcome
        assert self.outcome.kind is kind, self.outcome
        return self.outcome

    def response(self) -> Response:
        assert isinstance(self.outcome, Response), self.outcome
        return self.outcome

    def judged(self, reason: str, error_class: ErrorClass | None) -> Decision:
        decision = self.decision
        assert decision.reason == reason, decision
        assert (decision.error.error_class if decision.error else None) == error_class, decision
        return decision


async def poll(
    client: HttpClient,
    url: str,
    tls: TLSSettings = DEFAULT_TLS,
    success_when: str = 'response.body.status == "COMPLETED"',
) -> Poll:
    """One attempt of a watch on `url`, judged by the policy, with the checks every
    case shares."""
    spec = parse_spec(
        {"url": url, "requestTimeout": f"{REQUEST_TIMEOUT}s", "successWhen": success_when}
    )
    compiled = Cel().compile(spec)
    now = time.time()
    deadline = now + spec.timeout
    request = Request(
        method=spec.method,
        url=spec.url,
        headers=REQUEST_HEADERS,
        sensitive_headers=SENSITIVE,
        timeout=policy.request_timeout(spec, now, deadline),
        tls=tls,
    )
    tracemalloc.start()
    try:
        started = time.monotonic()
        outcome = await client.send(request)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    decision = policy.decide(
        spec, compiled, outcome, 0, now=time.time(), deadline=deadline, rand=lambda: 0.5
    )

    assert elapsed < spec.request_timeout + SLACK
    assert peak < MEMORY_BOUND, f"{peak} bytes at peak"
    messages = [decision.message, decision.error.message if decision.error else ""]
    if isinstance(outcome, RequestFailure):
        messages.append(outcome.message)
    assert not any(TOKEN in message for message in messages), messages
    # What the status would carry: last response (text cut to 1 KiB), result, messages.
    carried: dict[str, Any] = {"messages": messages}
    if isinstance(outcome, Response):
        carried["body"] = outcome.text[:1024]
        carried["result"] = final_result(compiled, outcome)[0]
    json.dumps(carried, allow_nan=False).encode()
    return Poll(outcome, decision, elapsed)


def url(port: int, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{port}/status"


def head(code: int, *headers: str) -> bytes:
    return "\r\n".join([f"HTTP/1.1 {code} X", *headers, "", ""]).encode()


def answer(*pieces: bytes) -> Handler:
    """Reads the request head, then writes each piece, waiting for the client to take
    it (so that the server side never buffers more than about a piece)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()

    return handler


def trickle(start: bytes, dribble: bytes, period: float = 0.25) -> Handler:
    """Slowloris: `start` at once, then `dribble` one byte every `period`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(start)
        for byte in dribble:
            await writer.drain()
            await asyncio.sleep(period)
            writer.write(bytes([byte]))

    return handler


def json_body(text: bytes | str) -> Handler:
    content = text.encode() if isinstance(text, str) else text
    return answer(
        head(200, "Content-Type: application/json", f"Content-Length: {len(content)}"), content
    )


# --- no usable connection -----------------------------------------------------------


async def test_connection_refused(client: HttpClient) -> None:
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = await poll(client, url(port))
    failure = result.failure(FailureKind.TRANSPORT)
    assert failure.message == f"connection refused by 127.0.0.1:{port}"
    result.judged("TransientError", ErrorClass.TRANSIENT)


@pytest.mark.parametrize("framing", ["Content-Length: 100000", "Transfer-Encoding: chunked"])
async def test_reset_mid_body(client: HttpClient, serve: Serve, framing: str) -> None:
    chunk = b"x" * 1000
    first = chunk if framing.startswith("Content") else b"3e8\r\n" + chunk + b"\r\n"

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head(200, framing) + first)
        await writer.drain()
        await asyncio.sleep(0.1)
        # Linger 0: closing sends a RST, not a FIN.
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)

    port = await serve(reset)
    failure = (await poll(client, url(port))).failure(FailureKind.TRANSPORT)
    assert failure.message == f"incomplete response body from 127.0.0.1:{port}"


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(trickle(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 100), id="headers"),
        pytest.param(
            trickle(head(200, "Content-Length: 100") + b'{"status": "', b"R" * 100), id="body"
        ),
    ],
)
async def test_slowloris_ends_at_the_request_timeout(
    client: HttpClient, serve: Serve, handler: Handler
) -> None:
    # A byte every 250 ms: the connection is never idle, the attempt still ends on time.
    result = await poll(client, url(await serve(handler)))
    failure = result.failure(FailureKind.TRANSPORT)
    assert failure.message == "request timed out after 1.5s"
    assert result.elapsed >= REQUEST_TIMEOUT - 0.05
    result.judged("TransientError", ErrorClass.TRANSIENT)


# --- TLS ----------------------------------------------------------------------------


@dataclass
class KeyPair:
    cert_file: Path
    key_file: Path

    @property
    def pem(self) -> str:
        return self.cert_file.read_text()

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, KeyPair]]:
    """Self-signed certificates, each trusted by the client through `ca_pem`, each with
    one thing wrong: a name other than 127.0.0.1, or a validity that ended in 2020."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("faulty-tls")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        folder, "req", "-x509", *key, "-days", "2", "-subj", "/CN=other.example",
        "-addext", "subjectAltName=DNS:other.example",
        "-keyout", "other-key.pem", "-out", "other.pem",
    )  # fmt: skip
    # `openssl req` cannot date a certificate in the past; `openssl ca` can.
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca = signer\n[signer]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = anything\ncopy_extensions = copy\n"
        "[anything]\ncommonName = supplied\n"
    )
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("01\n")
    openssl(
        folder, "req", "-new", *key, "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", "expired-key.pem", "-out", "expired.csr",
    )  # fmt: skip
    openssl(
        folder, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "expired-key.pem",
        "-in", "expired.csr", "-out", "expired.pem", "-notext",
        "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
    )  # fmt: skip
    yield {
        name: KeyPair(folder / f"{name}.pem", folder / f"{name}-key.pem")
        for name in ("other", "expired")
    }


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("other", "IP address mismatch, certificate is not valid for '127.0.0.1'."),
        ("expired", "certificate has expired"),
    ],
)
async def test_tls_certificate_problems(
    client: HttpClient,
    serve: Serve,
    certificates: dict[str, KeyPair],
    name: str,
    problem: str,
) -> None:
    pair = certificates[name]
    port = await serve(answer(), ssl_context=pair.server_context())
    result = await poll(client, url(port, "https"), tls=TLSSettings(ca_pem=pair.pem))
    failure = result.failure(FailureKind.TRANSPORT)
    assert failure.message == (f"TLS certificate verification failed: {problem} (127.0.0.1:{port})")
    result.judged("TransientError", ErrorClass.TRANSIENT)


# --- responses that are not an answer ------------------------------------------------


async def test_redirect_loop(client: HttpClient, serve: Serve) -> None:
    requests = 0

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:  # keep-alive: every hop may come on this connection
            await reader.readuntil(b"\r\n\r\n")
            requests += 1
            writer.write(head(302, "Location: /status", "Content-Length: 0"))
            await writer.drain()

    result = await poll(client, url(await serve(loop)))
    failure = result.failure(FailureKind.INVALID_RESPONSE)
    assert failure.message == "more than 5 redirects"
    assert requests == 6
    result.judged("InvalidResponse", ErrorClass.INVALID_RESPONSE)


def gzip_bomb(size: int = 64 * MiB) -> bytes:
    """`size` zero bytes, gzipped (about a thousandth of that), without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(MiB)
    return b"".join([*(packer.compress(zeros) for _ in range(size // MiB)), packer.flush()])


async def test_gzip_bomb(client: HttpClient, serve: Serve) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < MiB / 8
    headers = head(200, "Content-Encoding: gzip", f"Content-Length: {len(bomb)}")
    result = await poll(client, url(await serve(answer(headers, bomb))))
    failure = result.failure(FailureKind.INVALID_RESPONSE)
    assert failure.message == "response body exceeds 1 MiB"
    result.judged("InvalidResponse", ErrorClass.INVALID_RESPONSE)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_three_megabyte_body(client: HttpClient, serve: Serve, declared: bool) -> None:
    size, piece = 3_000_000, b"a" * 60_000
    if declared:
        pieces = [head(200, f"Content-Length: {size}"), *[piece] * (size // len(piece))]
    else:
        framed = b"%x\r\n%s\r\n" % (len(piece), piece)
        pieces = [head(200, "Transfer-Encoding: chunked"), *[framed] * (size // len(piece))]
        pieces.append(b"0\r\n\r\n")
    result = await poll(client, url(await serve(answer(*pieces))))
    failure = result.failure(FailureKind.INVALID_RESPONSE)
    assert failure.message == "response body exceeds 1 MiB"
    result.judged("InvalidResponse", ErrorClass.INVALID_RESPONSE)


@pytest.mark.parametrize(
    ("junk", "problem"),
    [
        pytest.param(
            [f"X-Junk: {TOKEN}{'a' * 100_000}"],
            "a line of its head is longer than 8190 bytes",
            id="100 KB header line",
        ),
        pytest.param(
            [f"X-Junk-{n}: {TOKEN}" for n in range(1000)],
            "Too many headers received",
            id="1000 headers",
        ),
        pytest.param(
            [f"X-Bad\x01Name: {TOKEN}"], "Invalid header token", id="control character in a name"
        ),
    ],
)
async def test_malformed_head(
    client: HttpClient, serve: Serve, junk: list[str], problem: str
) -> None:
    # The endpoint's own bytes (here with the token in them) are not quoted either:
    # a message says what was wrong, never what the endpoint sent.
    port = await serve(answer(head(200, *junk, "Content-Length: 2"), b"{}"))
    result = await poll(client, url(port))
    failure = result.failure(FailureKind.INVALID_RESPONSE)
    assert failure.message == f"invalid HTTP response from 127.0.0.1:{port}: {problem}"
    result.judged("InvalidResponse", ErrorClass.INVALID_RESPONSE)


# --- bodies that are not usable JSON -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param("[" * 10_000 + "]" * 10_000, "JSON nested deeper than 64 levels", id="deep"),
        pytest.param(
            "[" * 100_000 + "]" * 100_000,
            "JSON with more than 10000 arrays and objects",
            id="many-containers",
        ),
        pytest.param(
            "[" + "1," * 150_000 + "1]", "JSON with more than 100000 values", id="many-values"
        ),
        pytest.param('{"status": NaN}', "NaN is not valid JSON", id="NaN"),
        pytest.param('{"status": "x", "n": 1e400}', "JSON number out of range: 1e400", id="1e400"),
        pytest.param(b'\xff{"status": "COMPLETED"}', "not JSON: Expecting value", id="bad UTF-8"),
    ],
)
async def test_unusable_json_is_an_invalid_response(
    client: HttpClient, serve: Serve, body: str | bytes, problem: str
) -> None:
    result = await poll(client, url(await serve(json_body(body))))
    response = result.response()
    assert response.body is None
    assert response.body_problem is not None
    assert response.body_problem.startswith(problem)
    decision = result.judged("InvalidResponse", ErrorClass.INVALID_RESPONSE)
    assert decision.delay is not None  # polled again: the endpoint may recover


async def test_invalid_utf8_inside_a_string_is_replaced(client: HttpClient, serve: Serve) -> None:
    result = await poll(
        client, url(await serve(json_body(b'{"status": "COMPLETED", "by": "J\xf6rg"}')))
    )
    assert result.response().body == {"status": "COMPLETED", "by": "J\ufffdrg"}
    result.judged("SuccessConditionMet", None)


async def test_integers_beyond_int64_become_floats(client: HttpClient, serve: Serve) -> None:
    body = json.dumps({"status": "COMPLETED", "id": 2**64 + 1, "small": -(2**63)})
    result = await poll(client, url(await serve(json_body(body))))
    assert result.response().body == {"status": "COMPLETED", "id": 2.0**64, "small": -(2**63)}
    result.judged("SuccessConditionMet", None)


async def test_unusable_json_does_not_matter_to_a_condition_on_the_code(
    client: HttpClient, serve: Serve
) -> None:
    port = await serve(json_body('{"status": NaN}'))
    result = await poll(client, url(port), success_when="response.code == 200")
    result.judged("SuccessConditionMet", None)


# --- Response.body on hostile JSON, without a server --------------------------------


def parsed(text: str) -> tuple[Any, str | None]:
    response = Response(code=200, headers={}, text=text, latency_ms=1)
    return response.body, response.body_problem


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_value(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("text", "body", "problem"),
    [
        ('{"status": "RUNNING", "n": [1, 2.5]}', {"status": "RUNNING", "n": [1, 2.5]}, None),
        (" \r\n\t[1]\n", [1], None),
        ("null", None, None),
        ("", None, None),
        ("  ", None, "not JSON: Expecting value at line 1, column 3"),
        ("<html>", None, "not JSON: Expecting value at line 1, column 1"),
        ('{"a": 1} {"b": 2}', None, "not JSON: Extra data at line 1, column 10"),
        ("\ufeff{}", None, "not JSON: Expecting value at line 1, column 1"),
        (nested(MAX_JSON_DEPTH), nested_value(MAX_JSON_DEPTH), None),
        (nested(MAX_JSON_DEPTH + 1), None, "JSON nested deeper than 64 levels"),
        ('{"a": ' * 65 + "1" + "}" * 65, None, "JSON nested deeper than 64 levels"),
        ("[" * 10_000, None, "JSON nested deeper than 64 levels"),
        ("[" * 200_000, None, "JSON with more than 10000 arrays and objects"),
        # Brackets in strings are not nesting, and many siblings are not depth.
        (json.dumps(["[" * 100, "]" * 100]), ["[" * 100, "]" * 100], None),
        (json.dumps([[[]]] * 500), [[[]]] * 500, None),
        ("NaN", None, "NaN is not valid JSON"),
        ('{"x": Infinity}', None, "Infinity is not valid JSON"),
        ("[-Infinity]", None, "-Infinity is not valid JSON"),
        ("1e400", None, "JSON number out of range: 1e400"),
        ("-1.5E+308999", None, "JSON number out of range: -1.5E+308999"),
        ("1e-400", 0.0, None),
        ("9" * 400 + ".5", None, f"JSON number out of range: {'9' * 20}…"),
        ("1" * 5000, None, f"JSON number out of range: {'1' * 20}…"),
        (str(2**63 - 1), 2**63 - 1, None),
        (str(-(2**63)), -(2**63), None),
        (str(2**63), 2.0**63, None),
        (str(-(2**63) - 1), -(2.0**63), None),
        ("1" + "0" * 300, 1e300, None),
        # JSON escapes can spell what UTF-8 cannot carry: an unpaired surrogate.
        ('{"s": "\\ud800", "\\udfff": 1}', {"s": "\ufffd", "\ufffd": 1}, None),
        ('["\\ud83d\\ude00", "\\\\ud800"]', ["\U0001f600", "\\ud800"], None),
    ],
)
def test_body(text: str, body: Any, problem: str | None) -> None:
    assert parsed(text) == (body, problem)


@pytest.mark.parametrize(
    ("literal", "body", "problem"),
    [
        ("12", 12, None),
        ("-2.5e-3", -2.5e-3, None),
        (str(-(2**63)), -(2**63), None),
        (str(2**64), 2.0**64, None),
        ("1.5E+300", 1.5e300, None),
        ("1e999", None, "JSON number out of range: 1e999"),
        ("-1" + "0" * 400 + ".0", None, f"JSON number out of range: -{'1' + '0' * 18}…"),
        ("NaN", None, "NaN is not valid JSON"),
    ],
)
def test_long_texts_are_checked_the_same_way(literal: str, body: Any, problem: str | None) -> None:
    # Past a KiB of text, numbers are checked only where a scan finds a long run of
    # digits or a long exponent: strings can look like that too ("file-000").
    for padding in (["x" * 50] * 100, ["file-000", "1234567890123456789012"] * 100):
        text = f'{{"pad": {json.dumps(padding)}, "v": {literal}}}'
        assert parsed(text) == ((None, problem) if problem else ({"pad": padding, "v": body}, None))


def test_body_given_by_the_caller_is_kept() -> None:
    response = Response(code=200, headers={}, text="not json", latency_ms=1, _json={"a": 1})
    assert (response.body, response.body_problem) == ({"a": 1}, None)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    return 1 + max(map(depth, value), default=0) if isinstance(value, list) else 0


@settings(max_examples=300, deadline=None)
@given(json_values.filter(lambda value: depth(value) <= MAX_JSON_DEPTH))
def test_every_carriable_json_value_comes_back_as_it_was(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert parsed(text) == (value, None)


@settings(max_examples=500, deadline=None)
@given(st.text() | st.binary().map(lambda raw: raw.decode("utf-8", errors="replace")))
def test_any_text_gives_a_body_the_status_can_carry(text: str) -> None:
    body, problem = parsed(text)
    assert body is None or problem is None
    json.dumps(body, allow_nan=False, ensure_ascii=False).encode()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["[", "]", "{", "}", '"', "\\", "\\u", "d800", ",", ":", "1", "e9", "NaN", " "]
        ),
        max_size=300,
    ).map("".join)
)
def test_json_like_junk_gives_a_body_the_status_can_carry(text: str) -> None:
    body, problem = parsed(text)
    assert body is None or problem is None
    json.dumps(body, allow_nan=False, ensure_ascii=False).encode()


def test_brackets_and_commas_inside_strings_do_not_count_against_the_caps() -> None:
    text = json.dumps({"status": "DONE", "csv": "a,[b],{c}," * 40_000})
    response = Response(code=200, headers={}, text=text, latency_ms=1)
    assert response.body_problem is None
    assert response.body["status"] == "DONE"
