"""The async Kubernetes API client for what kopf does not do for us.

Status patches, Secret reads and Events go through one pooled httpx client,
authenticated with the same credentials kopf logged in with. Nothing blocks the
event loop. On a 401 (for example a rotated ServiceAccount token) the
credentials are loaded again once and the request is retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
API_VERSION = f"{GROUP}/{VERSION}"
JSON_PATCH = {"content-type": "application/json-patch+json"}
LIST_PAGE = 500
_INSTANCE = socket.gethostname()


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


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
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


def _make_client(info: kopf.ConnectionInfo) -> httpx.AsyncClient:
    headers = {"user-agent": "jobwatch-operator"}
    auth: tuple[str, str] | None = None
    if info.token:
        headers["authorization"] = f"Bearer {info.token}"
    elif info.username and info.password:
        auth = (info.username, info.password)
    return httpx.AsyncClient(
        base_url=info.server,
        headers=headers,
        auth=auth,
        verify=_ssl_context(info),
        timeout=httpx.Timeout(10.0),
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
    )


def _failure(error: ApiError) -> Exception:
    """What a failed list or watch raises: 410 Gone means "list again"."""
    return Expired(error) if error.status == 410 else error


def _selector(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels)


class KubeApi:
    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo]) -> None:
        self._credentials = credentials
        self._client = _make_client(credentials())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        for retry in (True, False):
            response = await self._client.request(
                method, path, json=json, headers=headers, params=params
            )
            if response.status_code == 401 and retry:
                await self._relogin()
                continue
            return response
        raise AssertionError("unreachable")

    async def _relogin(self) -> None:
        # A rotated ServiceAccount token, for one: load the credentials again.
        old, self._client = self._client, _make_client(self._credentials())
        await old.aclose()

    @staticmethod
    def _error(response: httpx.Response) -> ApiError:
        try:
            message = str(response.json().get("message", ""))
        except ValueError:
            message = response.text[:200]
        return ApiError(response.status_code, message)

    async def patch_status(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        """Replaces `status` as a whole, only on the object with this uid.

        A JSON patch rather than a merge patch: a merge patch reads null as
        "delete", and `status.result` may hold nulls that must stay. The `test`
        of the uid keeps a write from landing on a re-created namesake.
        """
        response = await self._request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{PLURAL}/{ref.name}/status",
            json=[
                {"op": "test", "path": "/metadata/uid", "value": ref.uid},
                {
                    "op": "add",
                    "path": "/status",
                    "value": {k: v for k, v in status.items() if v is not None},
                },
            ],
            headers=JSON_PATCH,
        )
        if response.is_error:
            raise self._error(response)

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
                response = await pending
                if response.is_error:
                    raise _failure(self._error(response))
                page = response.json()
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
        async with self._stream(self._collection(namespace), params, read_seconds) as response:
            if response.is_error:
                await response.aread()
                raise _failure(self._error(response))
            if opened is not None:
                opened()
            async for line in response.aiter_lines():
                if not line:
                    continue
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
    ) -> AsyncIterator[httpx.Response]:
        timeout = httpx.Timeout(10.0, read=read_seconds)
        for retry in (True, False):
            async with self._client.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code == 401 and retry:
                    await self._relogin()
                    continue
                yield response
                return

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        """The Secret, or None when it does not exist (or we may not read it)."""
        response = await self._request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if response.status_code in (403, 404):
            return None
        if response.is_error:
            raise self._error(response)
        body = response.json()
        return Secret(
            labels=body.get("metadata", {}).get("labels") or {},
            data={k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()},
        )

    async def create_event(
        self, ref: ObjectRef, *, warning: bool, reason: str, message: str
    ) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        response = await self._request(
            "POST", f"/api/v1/namespaces/{ref.namespace}/events", json=event
        )
        if response.is_error:
            raise self._error(response)
