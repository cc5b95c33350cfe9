"""The async Kubernetes API client for what kopf does not do for us.

Status patches, Secret reads, Events, Leases and the JobWatch informer's list and watch
go through one pool of HTTP/1.1 connections (kubehttp.py), authenticated with the same
credentials kopf logged in with. Not httpx, and no longer aiohttp: their request and
response machinery cost 1-4 ms of CPU per status write, more than everything else a
write does together. Nothing blocks the event loop. On a 401 (for example a rotated
ServiceAccount token) the credentials are loaded again once and the request is retried.
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
import sys
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from . import kubehttp

GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
API_VERSION = f"{GROUP}/{VERSION}"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
LIST_PAGE = 500
# Per request: connecting (a pooled connection included) and each read.
TIMEOUT = 10.0
MAX_CONNECTIONS = 16
_INSTANCE = socket.gethostname()
# Where a ServiceAccount's credentials are mounted in a pod.
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# A status field's JSON text, as it goes into a patch: compact, ASCII (a lone surrogate a
# job's endpoint sent cannot make the body unencodable), no NaN or Infinity (not JSON).
encode_json = json.JSONEncoder(allow_nan=False, sort_keys=True, separators=(",", ":")).encode

log = logging.getLogger(__name__)
# No answer from the API server: not connected, the connection broke, or it timed out.
Unreachable = kubehttp.Unreachable


class Expired(Exception):
    """The resourceVersion to watch from is too old (410 Gone): list again."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

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


def _pointer(key: str) -> str:
    return "/status/" + key.replace("~", "~0").replace("/", "~1")


def status_patch(uid: str, status: Mapping[str, Any]) -> bytes:
    """The JSON patch that writes `status`, only on the object with this uid.

    A JSON patch rather than a merge patch: a merge patch reads null as "delete", and
    `status.result` may hold nulls that must stay. The `test` of the uid keeps a write
    from landing on a re-created namesake. Written whole (`add /status`) unless the
    status says which fields changed: then only those (`add /status/<field>`), so that
    a progress write sends a few hundred bytes, not the whole status again.
    """
    if isinstance(status, EncodedStatus):
        texts, changed = status.texts, status.changed
    else:
        texts = {k: encode_json(v) for k, v in status.items() if v is not None}
        changed = None
    ops = [f'{{"op":"test","path":"/metadata/uid","value":{encode_json(uid)}}}']
    if changed is None:
        fields = ",".join(f"{encode_json(k)}:{text}" for k, text in texts.items())
        ops.append(f'{{"op":"add","path":"/status","value":{{{fields}}}}}')
    else:
        ops += [
            f'{{"op":"add","path":{encode_json(_pointer(k))},"value":{texts[k]}}}' for k in changed
        ]
    return f"[{','.join(ops)}]".encode()


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
    if "kubernetes" in sys.modules and sys.modules["kubernetes"] is None:
        del sys.modules["kubernetes"]  # kept out by __main__ until now
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


def _pool(info: kopf.ConnectionInfo) -> kubehttp.Pool:
    """The connections of one login."""
    headers = {"user-agent": "jobwatch-operator"}
    if info.token:
        headers["authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    elif info.username and info.password:
        headers["authorization"] = kubehttp.basic_auth(info.username, info.password)
    server = info.server.rstrip("/")
    context = _ssl_context(info) if server.startswith("https:") else None
    origin = kubehttp.Origin.parse(server, context, info.proxy_url, info.trust_env)
    return kubehttp.Pool(
        origin,
        headers,
        max_connections=MAX_CONNECTIONS,
        connect_timeout=TIMEOUT,
        read_timeout=TIMEOUT,
    )


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
    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo]) -> None:
        self._credentials = credentials
        self._pool = _pool(credentials())

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; the body is read whole, and parsed by nobody
        who does not need it (a status write's answer, the whole object, is dropped)."""
        target = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        for retry in (True, False):
            pool = self._pool
            status, payload = await pool.request(
                method, target, body, content_type if body is not None else None
            )
            if status == 401 and retry:
                await self._relogin(pool)
                continue
            return status, payload
        raise AssertionError("unreachable")

    async def _relogin(self, used: kubehttp.Pool) -> None:
        # A rotated ServiceAccount token, for one: load the credentials again, once for
        # all the requests that were refused with the old ones.
        if self._pool is not used:
            return
        self._pool = _pool(self._credentials())
        await used.aclose()

    async def patch_status(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        """Writes `status` (see `status_patch`), only on the object with this uid."""
        code, body = await self._request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{PLURAL}/{ref.name}/status",
            body=status_patch(ref.uid, status),
            content_type=JSON_PATCH,
        )
        if code >= 400:
            raise _error(code, body)

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
        pending = asyncio.ensure_future(self._request("GET", path, params=dict(params)))
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
                    pending = asyncio.ensure_future(self._request("GET", path, params=dict(params)))
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
        """The non-empty lines of a streamed answer, once it has been accepted."""
        target = f"{path}?{urllib.parse.urlencode(params)}"
        for retry in (True, False):
            pool = self._pool
            async with pool.stream(target, read_seconds) as (status, pieces):
                if status == 401 and retry:
                    pass  # logged in again below, outside this answer
                elif status >= 400:
                    raise _failure(_error(status, b"".join([piece async for piece in pieces])))
                else:
                    yield _lines(pieces)
                    return
            await self._relogin(pool)
        raise AssertionError("unreachable")

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
