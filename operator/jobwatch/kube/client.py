"""The HTTP side of the Kubernetes API client: one login's connections, a request with
its deadline and retries, a streamed answer, and logging in again (layer: kube adapter).

Two httpx clients per login: one for requests (at most MAX_CONNECTIONS connections, the
wait for one bounded) and one for the informer's lists and long-lived watch streams, so
that no number of watched namespaces can hold a status write or a Lease renewal back.

A request has a timeout per phase (connect, each read and write, the wait for a pooled
connection) and a deadline as a whole. Only a GET is sent again after a connection
failure: a write whose answer was lost may have been applied, and its caller decides
(the status writer retries a write that tests the uid, the elector's next round reads
the Lease again, Events are best effort). On a 401 (a rotated ServiceAccount token,
say) the credentials are loaded again once and the request is sent again: a 401 was
applied nowhere. Requests already in flight keep the clients they started on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import httpx
import kopf

from jobwatch.kube.errors import Unreachable, api_error, list_failure, unreachable
from jobwatch.kube.login import client_settings

JSON = "application/json"
# Per request phase: connecting, each read and write, the wait for a pooled connection.
TIMEOUT = 10.0
# Per request as a whole, answer included: a server that trickles cannot hold it open.
DEADLINE = 30.0
# A 429 with Retry-After is sent again after it (up to this long), at most
# MAX_THROTTLED times and within the request's deadline; then the caller sees the 429.
MAX_RETRY_AFTER = 5.0
MAX_THROTTLED = 3
# Requests (not the informer's) in flight at once: the status writer's 8 writers,
# Lease updates, Secret reads and Events.
MAX_CONNECTIONS = 16
# kube-apiserver closes a connection idle for 90 s; we close ours first, so that a
# request never goes out on a connection the server is closing.
KEEPALIVE_EXPIRY = 60.0


class _Session:
    """The two clients of one login, and how many requests use them: a re-login
    retires a session, which closes once its last request has ended."""

    def __init__(self, requests: httpx.AsyncClient, informer: httpx.AsyncClient) -> None:
        self.requests, self.informer = requests, informer
        self._users = 0
        self._idle: Callable[[_Session], None] | None = None  # set once retired

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1
            if self._idle is not None and not self._users:
                self._idle(self)

    def retire(self, idle: Callable[[_Session], None]) -> None:
        """`idle` is called once no request uses the session any more."""
        self._idle = idle
        if not self._users:
            idle(self)

    async def aclose(self) -> None:
        await self.requests.aclose()
        await self.informer.aclose()


def _session(info: kopf.ConnectionInfo) -> _Session:
    """The two clients of one login. The informer's has no limit of its own: it holds
    one stream per watched namespace (or one cluster-wide), and while a namespace is
    listed, one page."""
    settings = client_settings(info)

    def client(most: int | None) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=most,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        return httpx.AsyncClient(
            base_url=settings.server,
            headers={"user-agent": "jobwatch-operator", "accept": JSON, **settings.auth},
            verify=settings.verify,
            proxy=settings.proxy,
            trust_env=settings.trust_env,
            timeout=httpx.Timeout(TIMEOUT),
            limits=limits,
        )

    return _Session(client(MAX_CONNECTIONS), client(None))


def _retry_after(response: httpx.Response) -> float | None:
    """A 429's Retry-After in seconds (as the API server sends it), or None."""
    value = response.headers.get("retry-after", "")
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() and len(value) < 8 else None


class KubeClient:
    """Requests to the API server with one login at a time (see the module's docstring)."""

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo],
        *,
        deadline: float = DEADLINE,
    ) -> None:
        self._credentials = credentials
        self._deadline = deadline
        self._session = _session(credentials())
        self._login = asyncio.Lock()  # one re-login at a time
        # Retired sessions being closed, held so that the loop keeps the tasks alive.
        self._closing: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        await self._session.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _close(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(session.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
        informer: bool = False,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; the body is read whole, and parsed by nobody
        who does not need it (a status write's answer, the whole object, is dropped).
        `informer`: on the informer's client (lists), not the requests' one."""
        try:
            async with asyncio.timeout(self._deadline):
                return await self._exchange(
                    method,
                    path,
                    body=body,
                    content_type=content_type,
                    params=params,
                    informer=informer,
                )
        except TimeoutError:
            raise Unreachable(f"no whole answer within {self._deadline:g} s") from None

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        content_type: str,
        params: Mapping[str, str] | None,
        informer: bool,
    ) -> tuple[int, bytes]:
        headers = {"content-type": content_type} if body is not None else None
        relogin = True
        # A GET changes nothing: it is sent once more if the connection failed.
        again = method == "GET"
        throttled = MAX_THROTTLED
        while True:
            session = self._session
            with session.using():
                client = session.informer if informer else session.requests
                try:
                    response = await client.request(
                        method, path, content=body, headers=headers, params=params
                    )
                except httpx.TimeoutException as exc:
                    raise unreachable(exc) from None
                except httpx.TransportError as exc:
                    if not again:
                        raise unreachable(exc) from None
                    again = False
                    continue
                except httpx.RequestError as exc:  # an answer we cannot decode, say
                    raise unreachable(exc) from None
            status = response.status_code
            if status == 401 and relogin:
                relogin = False
                await self._relogin(session)
                continue
            wait = _retry_after(response) if status == 429 and throttled else None
            if wait is not None:
                throttled -= 1
                # API Priority and Fairness refused it before anything was applied:
                # sent again when the server says, within the deadline.
                await asyncio.sleep(wait)
                continue
            return status, response.content

    async def _relogin(self, used: _Session) -> None:
        # A rotated ServiceAccount token, for one: load the credentials again, once for
        # all the requests that were refused with the old ones. Requests in flight go
        # on with the old clients, which close once the last has ended. Loading reads
        # files (and may run a kubeconfig's exec plugin): on a thread, not the loop.
        async with self._login:
            if self._session is not used:
                return
            self._session = await asyncio.to_thread(lambda: _session(self._credentials()))
        used.retire(self._close)

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, params: Mapping[str, str], read_seconds: float
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The non-empty lines of a streamed answer, once it has been accepted. No
        deadline as a whole (a watch lasts minutes): `read_seconds` of silence end it."""
        timeout = httpx.Timeout(TIMEOUT, read=read_seconds)
        for relogin in (True, False):
            session = self._session
            with session.using():
                try:
                    async with session.informer.stream(
                        "GET", path, params=params, timeout=timeout
                    ) as response:
                        status = response.status_code
                        if status == 401 and relogin:
                            pass  # logged in again below, outside this answer
                        elif status >= 400:
                            raise list_failure(api_error(status, await response.aread()))
                        else:
                            yield _lines(response.aiter_bytes())
                            return
                except httpx.RequestError as exc:
                    raise unreachable(exc) from None
            await self._relogin(session)
        raise AssertionError("unreachable")


async def _lines(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-empty lines of a stream, however long (a JobWatch may be large: the API
    server bounds it)."""
    buffer = bytearray()
    async for chunk in pieces:
        start = len(buffer)
        buffer += chunk
        end = buffer.find(b"\n", start)
        if end < 0:
            continue
        begin = 0
        while end >= 0:
            if end > begin:
                yield bytes(buffer[begin:end])
            begin = end + 1
            end = buffer.find(b"\n", begin)
        del buffer[:begin]
    if buffer.strip():
        yield bytes(buffer)
