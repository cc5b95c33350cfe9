"""The async Kubernetes API client for what kopf does not do for us.

Status patches, Secret reads, Events, Leases and the JobWatch informer's list and watch
go through httpx, authenticated with the same credentials kopf logged in with. Two
clients per login: one for requests (at most MAX_CONNECTIONS connections, the wait for
one bounded) and one for the informer's lists and long-lived watch streams, so that no
number of watched namespaces can hold a status write or a Lease renewal back.

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
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
API_VERSION = f"{GROUP}/{VERSION}"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
LIST_PAGE = 500
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
_INSTANCE = socket.gethostname()
# Where a ServiceAccount's credentials are mounted in a pod.
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# A status field's JSON text, as it goes into a patch: compact, ASCII (a lone surrogate a
# job's endpoint sent cannot make the body unencodable), no NaN or Infinity (not JSON).
encode_json = json.JSONEncoder(allow_nan=False, sort_keys=True, separators=(",", ":")).encode

log = logging.getLogger(__name__)


class Unreachable(Exception):
    """No (whole) answer from the API server: not connected, the connection broke, or
    it timed out."""


class Expired(Exception):
    """The resourceVersion to watch from is too old (410 Gone): list again."""


# What kube-apiserver answers (422, reason Invalid, no details) when a JSON patch does not
# apply to the object as stored: one of its `test`s failed (the uid, the status fence),
# or a path it adds to is missing. A refusal by the schema names the object and the
# fields instead. Measured on kube-apiserver 1.35 (tests/e2e/test_status_fence.py).
PATCH_NOT_APPLIED = "the server rejected our request due to an error in our request"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def gone(self) -> bool:
        """The object is gone or was replaced by another with the same name."""
        return self.status in (404, 409)

    @property
    def retriable(self) -> bool:
        """The same request may well succeed a moment later: 429, 5xx, and 403, which a
        restarted API server answers until its authorizer has loaded the RBAC rules (a
        status write refused then would be lost for good, an end included)."""
        return self.status in (403, 429) or self.status >= 500

    @property
    def not_applied(self) -> bool:
        """A JSON patch refused because it does not apply to the object as stored (a
        `test` failed), not because of what it writes."""
        return self.status == 422 and self.message == PATCH_NOT_APPLIED


@dataclass(frozen=True, slots=True)
class ObjectRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Secret:
    labels: Mapping[str, str]
    data: Mapping[str, bytes]


class EncodedStatus(dict[str, Any]):
    """A whole `status` (a None value: the field is absent) as the status writer has
    already encoded it: `texts` holds the JSON text of each present field, and `changed`
    the fields that differ from what the object's status holds (None: not known, the
    status is written whole). A dict, so that whoever reads it as a plain status can."""

    __slots__ = ("changed", "texts")

    def __init__(
        self, status: Mapping[str, Any], texts: Mapping[str, str], changed: tuple[str, ...] | None
    ) -> None:
        super().__init__(status)
        self.texts, self.changed = texts, changed


@dataclass(frozen=True, slots=True)
class Fence:
    """What a status write expects the object's stored status to hold: whether there is
    one, who wrote it (`status.holder`) and its phase. The write is refused unless the
    object still holds exactly that, so a replica that lost the object cannot undo what
    the object's new holder wrote (see `status_patch`)."""

    present: bool
    holder: str | None
    phase: str | None

    @classmethod
    def of(cls, status: object) -> Fence:
        """The fence for a stored `status` (None: the object has none)."""
        if not isinstance(status, Mapping):
            return cls(status is not None, None, None)
        holder, phase = status.get("holder"), status.get("phase")
        return cls(
            True,
            holder if isinstance(holder, str) else None,
            phase if isinstance(phase, str) else None,
        )


def _pointer(key: str) -> str:
    return "/status/" + key.replace("~", "~0").replace("/", "~1")


def status_patch(uid: str, status: Mapping[str, Any], fence: Fence | None = None) -> bytes:
    """The JSON patch that writes `status`, only on the object with this uid, and with a
    `fence` only while its stored status is still what the fence says.

    A JSON patch rather than a merge patch: a merge patch reads null as "delete", and
    `status.result` may hold nulls that must stay. The `test` of the uid keeps a write
    from landing on a re-created namesake; the fence's tests (`/status` null, or
    `/status/holder` and `/status/phase`, null matching an absent field) keep a replica
    that lost the object from overwriting the status its new holder wrote. Written whole
    (`add /status`) unless the status says which fields changed: then only those (`add
    /status/<field>`), so that a progress write sends a few hundred bytes, not the whole
    status again.
    """
    if isinstance(status, EncodedStatus):
        texts, changed = status.texts, status.changed
    else:
        texts = {k: encode_json(v) for k, v in status.items() if v is not None}
        changed = None
    ops = [f'{{"op":"test","path":"/metadata/uid","value":{encode_json(uid)}}}']
    if fence is not None:
        ops += _fence_tests(fence)
    if changed is None:
        fields = ",".join(f"{encode_json(k)}:{text}" for k, text in texts.items())
        ops.append(f'{{"op":"add","path":"/status","value":{{{fields}}}}}')
    else:
        ops += [
            f'{{"op":"add","path":{encode_json(_pointer(k))},"value":{texts[k]}}}' for k in changed
        ]
    return f"[{','.join(ops)}]".encode()


def _fence_tests(fence: Fence) -> list[str]:
    def test(path: str, value: str | None) -> str:
        return f'{{"op":"test","path":"{path}","value":{encode_json(value)}}}'

    if not fence.present:
        return [test("/status", None)]
    return [test("/status/holder", fence.holder), test("/status/phase", fence.phase)]


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The operator's credentials, as client-go finds them: in a pod, its
    ServiceAccount's; elsewhere, the current context of the kubeconfig.

    Read by kopf's own small loaders, not through the `kubernetes` package: importing
    that costs about 16 MiB of memory (__main__ keeps kopf from importing it). A
    kubeconfig those loaders cannot use (an exec plugin, an auth provider, a token file,
    paths relative to the kubeconfig) is handed to the `kubernetes` package after all.
    """
    info = _in_cluster(settings)
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings)
        if info is None or not _complete(info):
            info = _via_kubernetes_package(settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials found (in-cluster or KUBECONFIG)")
    _settings(info)  # a server, proxy or TLS setting we cannot use stops the start here
    return info


def _in_cluster(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not os.path.exists(f"{SERVICE_ACCOUNT}/token"):
        return None
    info = kopf.login_with_service_account(settings=settings)
    if info is None:
        return None
    # The service's address, as client-go uses it: no DNS lookup of kubernetes.default.svc.
    host = f"[{host}]" if ":" in host else host
    return dataclasses.replace(info, server=f"https://{host}:{port}")


def _complete(info: kopf.ConnectionInfo) -> bool:
    """Whether kopf's kubeconfig loader found everything needed to connect."""
    paths = (info.ca_path, info.certificate_path, info.private_key_path)
    if any(path and not os.path.isabs(os.fsdecode(path)) for path in paths):
        return False  # relative to the kubeconfig's folder, which kopf's loader ignores
    return bool(info.token or info.certificate_path or info.certificate_data or info.username)


def _via_kubernetes_package(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    try:
        import kubernetes  # noqa: F401,PLC0415  # optional: only this login needs it
    except ImportError:
        raise kopf.LoginError(
            "this kubeconfig needs the `kubernetes` package (an exec plugin, an auth"
            " provider, a token file or relative paths): pip install 'jobwatch[kubeconfig]'"
        ) from None
    return kopf.login_via_client(logger=log, settings=settings)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    if info.insecure:
        # insecure-skip-tls-verify: encrypted, not verified (client certificates too).
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(
            cafile=info.ca_path,
            cadata=base64.b64decode(info.ca_data).decode() if info.ca_data else None,
        )
    cert_path, key_path = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        # ssl can only load a client certificate from files.
        with (
            tempfile.NamedTemporaryFile("wb", suffix=".crt") as cert,
            tempfile.NamedTemporaryFile("wb", suffix=".key") as key,
        ):
            cert.write(base64.b64decode(info.certificate_data))
            key.write(base64.b64decode(info.private_key_data))
            cert.flush()
            key.flush()
            context.load_cert_chain(cert.name, key.name)
    elif cert_path and key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


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


@dataclass(frozen=True)
class _Settings:
    """How to reach the API server with one login's credentials."""

    server: httpx.URL
    verify: ssl.SSLContext | bool
    headers: Mapping[str, str] = dataclasses.field(repr=False)
    proxy: str | None
    trust_env: bool


def _settings(info: kopf.ConnectionInfo) -> _Settings:
    """Fails closed: a server URL that is not http(s), an https server without a usable
    TLS setting, or a proxy we cannot use is a `kopf.LoginError` naming the kubeconfig
    field, never a connection in clear text."""
    try:
        server = httpx.URL(info.server)
    except (httpx.InvalidURL, TypeError) as exc:
        raise kopf.LoginError(
            f"the cluster's server URL (kubeconfig `server`) is invalid: {exc}"
        ) from None
    # httpx lowercases the scheme: `HTTPS://` is TLS, as kubectl has it.
    if server.scheme not in ("http", "https") or not server.host:
        raise kopf.LoginError(
            f"the cluster's server URL (kubeconfig `server`) must be http:// or https://"
            f" with a host, not {server.scheme or 'no scheme'}://"
        )
    verify: ssl.SSLContext | bool = False
    if server.scheme == "https":
        try:
            verify = _ssl_context(info)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise kopf.LoginError(
                "cannot use the cluster's TLS settings (kubeconfig `certificate-authority`,"
                f" `client-certificate`, `client-key` or their `-data`): {exc}"
            ) from None
    if info.proxy_url is not None and _scheme(info.proxy_url) not in ("http", "https"):
        raise kopf.LoginError("the kubeconfig's `proxy-url` must be an http:// or https:// URL")
    headers = {"user-agent": "jobwatch-operator", "accept": JSON}
    if info.token:
        headers["authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    elif info.username and info.password:
        credentials = f"{info.username}:{info.password}".encode()
        headers["authorization"] = "Basic " + base64.b64encode(credentials).decode()
    # HTTPS_PROXY, NO_PROXY: only when kopf's settings say the environment counts.
    return _Settings(server, verify, headers, info.proxy_url, info.trust_env)


def _session(info: kopf.ConnectionInfo) -> _Session:
    """The two clients of one login. The informer's has no limit of its own: it holds
    one stream per watched namespace (or one cluster-wide), and while a namespace is
    listed, one page."""
    settings = _settings(info)

    def client(most: int | None) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=most,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        return httpx.AsyncClient(
            base_url=settings.server,
            headers=settings.headers,
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


def _scheme(url: str) -> str | None:
    try:
        return httpx.URL(url).scheme
    except (httpx.InvalidURL, TypeError):
        return None


def _unreachable(exc: Exception) -> Unreachable:
    # httpx's messages name no header and no token; some are empty.
    return Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _failure(error: ApiError) -> Exception:
    """What a failed list or watch raises: 410 Gone means "list again"."""
    return Expired(error) if error.status == 410 else error


def _selector(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels)


def _error(status: int, body: bytes) -> ApiError:
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    return ApiError(status, message)


class KubeApi:
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

    async def _request(
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
                    raise _unreachable(exc) from None
                except httpx.TransportError as exc:
                    if not again:
                        raise _unreachable(exc) from None
                    again = False
                    continue
                except httpx.RequestError as exc:  # an answer we cannot decode, say
                    raise _unreachable(exc) from None
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

    async def patch_status(
        self, ref: ObjectRef, status: Mapping[str, Any], fence: Fence | None = None
    ) -> None:
        """Writes `status` (see `status_patch`), only on the object with this uid, and
        with a `fence` only if its stored status is as the fence says (else an ApiError
        that is `not_applied`)."""
        code, body = await self._request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{PLURAL}/{ref.name}/status",
            body=status_patch(ref.uid, status, fence),
            content_type=JSON_PATCH,
        )
        if code >= 400:
            raise _error(code, body)

    async def get_jobwatch(self, ref: ObjectRef) -> dict[str, Any] | None:
        """The object as stored, or None when it is gone (or is a namesake with another
        uid)."""
        found = await self.read_jobwatch(ref.namespace, ref.name)
        if found is None or (found.get("metadata") or {}).get("uid") != ref.uid:
            return None
        return found

    @staticmethod
    def _collection(namespace: str | None) -> str:
        if namespace is None:
            return f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"

    async def list_jobwatches(
        self, namespace: str | None, labels: tuple[tuple[str, str], ...] = ()
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str | None]]:
        """JobWatches of one namespace (None: all), a page at a time, each with the
        list's resourceVersion (on the last page, the one to watch from).

        Paged so that neither the API server nor we hold 10k objects at once. The next
        page is requested before this one is handed out, so that the API server reads
        it while the caller takes in this one.
        """
        params = {"limit": str(LIST_PAGE)}
        if labels:
            params["labelSelector"] = _selector(labels)
        path = self._collection(namespace)
        pending = asyncio.ensure_future(
            self._request("GET", path, params=dict(params), informer=True)
        )
        try:
            while True:
                code, body = await pending
                if code >= 400:
                    raise _failure(_error(code, body))
                page = json.loads(body)
                meta = page.get("metadata") or {}
                token = meta.get("continue")
                if token:
                    params["continue"] = token
                    pending = asyncio.ensure_future(
                        self._request("GET", path, params=dict(params), informer=True)
                    )
                yield page.get("items") or [], meta.get("resourceVersion")
                if not token:
                    return
        finally:
            if pending.done():
                if not pending.cancelled():
                    pending.exception()  # retrieved: a page nobody asked for may fail
            else:
                pending.cancel()

    async def watch_jobwatches(
        self,
        namespace: str | None,
        resource_version: str,
        labels: tuple[tuple[str, str], ...] = (),
        server_timeout: int = 300,
        *,
        opened: Callable[[], None] | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events from `resource_version` on, bookmarks included, until
        the API server ends the stream (after about `server_timeout` seconds).

        `opened` is called once the server has accepted the watch: a quiet namespace
        may send nothing for a minute, and the caller would not know it works."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(server_timeout),
        }
        if labels:
            params["labelSelector"] = _selector(labels)
        # Quiet namespaces send nothing for minutes (bookmarks come about once a
        # minute); a read that waits past the server's own timeout means a dead stream.
        read_seconds = server_timeout + 30.0
        async with self._stream(self._collection(namespace), params, read_seconds) as lines:
            if opened is not None:
                opened()
            async for line in lines:
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise _failure(
                        ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
                    )
                yield str(kind), obj

    @contextlib.asynccontextmanager
    async def _stream(
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
                            raise _failure(_error(status, await response.aread()))
                        else:
                            yield _lines(response.aiter_bytes())
                            return
                except httpx.RequestError as exc:
                    raise _unreachable(exc) from None
            await self._relogin(session)
        raise AssertionError("unreachable")

    async def read_jobwatch(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The JobWatch as stored now (a quorum read), or None when there is none."""
        code, payload = await self._request(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        )
        if code == 404:
            return None
        if code >= 400:
            raise _error(code, payload)
        body = json.loads(payload)
        return body if isinstance(body, dict) else None

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        """The Secret, or None when it does not exist (or we may not read it)."""
        code, payload = await self._request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if code in (403, 404):
            return None
        if code >= 400:
            raise _error(code, payload)
        body = json.loads(payload)
        return Secret(
            labels=body.get("metadata", {}).get("labels") or {},
            data={k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()},
        )

    async def create_event(
        self,
        ref: ObjectRef,
        *,
        warning: bool,
        reason: str,
        message: str,
        count: int = 1,
        first_seen: datetime.datetime | None = None,
    ) -> None:
        """One core/v1 Event about `ref`. `count` > 1 with `first_seen` stands for that
        many similar occurrences since then, as client-go's event correlator writes them."""
        now_time = datetime.datetime.now(datetime.UTC)
        now = now_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        first = (first_seen or now_time).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": "JobWatch",
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "jobwatch-operator"},
            "reportingComponent": "jobwatch.dev/operator",
            "reportingInstance": _INSTANCE,
            "firstTimestamp": first,
            "lastTimestamp": now,
            "count": count,
        }
        code, body = await self._request(
            "POST", f"/api/v1/namespaces/{ref.namespace}/events", body=encode_json(event).encode()
        )
        if code >= 400:
            raise _error(code, body)

    # --- Leases (leases.py): the buckets replicas share, and one per replica ---------

    @staticmethod
    def _leases(namespace: str) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def _lease_request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        payload = None if body is None else encode_json(body).encode()
        code, answer = await self._request(method, path, body=payload, params=params)
        if code >= 400:
            raise _error(code, answer)
        return dict(json.loads(answer))

    async def list_leases(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        listed = await self._lease_request(
            "GET", self._leases(namespace), params={"labelSelector": selector}
        )
        return list(listed.get("items") or [])

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._lease_request("POST", self._leases(namespace), body)

    async def replace_lease(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """An update that fails with 409 if the Lease changed since `body` was read."""
        return await self._lease_request("PUT", f"{self._leases(namespace)}/{name}", body)

    async def delete_lease(self, namespace: str, name: str) -> None:
        code, answer = await self._request("DELETE", f"{self._leases(namespace)}/{name}")
        if code >= 400 and code != 404:
            raise _error(code, answer)


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
