"""The Kubernetes API calls the operator makes beyond what kopf does for it (layer: kube
adapter).

JobWatch reads, lists and watches (the informer's), status patches with their fence,
deletions after the TTL with their preconditions, Secret reads, Events and Leases, each
one request through `KubeClient` (client.py: connections, deadlines, retries, re-login),
authenticated with the credentials kopf logged in with (login.py).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from jobwatch.core.patch import Fence, encode_json, status_patch
from jobwatch.core.refs import ObjectRef
from jobwatch.kube.client import DEADLINE, KubeClient
from jobwatch.kube.errors import ApiError, api_error, list_failure

GROUP, VERSION, PLURAL = "jobwatch.dev", "v1alpha1", "jobwatches"
API_VERSION = f"{GROUP}/{VERSION}"
JSON_PATCH = "application/json-patch+json"
LIST_PAGE = 500


@dataclass(frozen=True, slots=True)
class Secret:
    labels: Mapping[str, str]
    data: Mapping[str, bytes]
    # False when the API server refused the operator the read (403): told apart from a
    # missing Secret, since the fix is the operator's RBAC, not the tenant's Secret.
    readable: bool = True


FORBIDDEN_SECRET = Secret(labels={}, data={}, readable=False)


class KubeApi:
    """The operator's requests to the API server, one method per call it makes."""

    def __init__(
        self,
        credentials: Callable[[], kopf.ConnectionInfo],
        *,
        deadline: float = DEADLINE,
    ) -> None:
        self._client = KubeClient(credentials, deadline=deadline)
        self._instance = socket.gethostname()  # reportingInstance of our Events

    async def aclose(self) -> None:
        await self._client.aclose()

    async def patch_status(
        self, ref: ObjectRef, status: Mapping[str, Any], fence: Fence | None = None
    ) -> None:
        """Writes `status` (see `status_patch`), only on the object with this uid, and
        with a `fence` only if its stored status is as the fence says (else an ApiError
        that is `not_applied`)."""
        code, body = await self._client.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{PLURAL}/{ref.name}/status",
            body=status_patch(ref.uid, status, fence),
            content_type=JSON_PATCH,
        )
        if code >= 400:
            raise api_error(code, body)

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
            self._client.request("GET", path, params=dict(params), informer=True)
        )
        try:
            while True:
                code, body = await pending
                if code >= 400:
                    raise list_failure(api_error(code, body))
                page = json.loads(body)
                meta = page.get("metadata") or {}
                token = meta.get("continue")
                if token:
                    params["continue"] = token
                    pending = asyncio.ensure_future(
                        self._client.request("GET", path, params=dict(params), informer=True)
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
        async with self._client.stream(self._collection(namespace), params, read_seconds) as lines:
            if opened is not None:
                opened()
            async for line in lines:
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise list_failure(
                        ApiError(int(obj.get("code") or 500), str(obj.get("message", "")))
                    )
                yield str(kind), obj

    async def read_jobwatch(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The JobWatch as stored now (a quorum read), or None when there is none."""
        code, payload = await self._client.request(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        )
        if code == 404:
            return None
        if code >= 400:
            raise api_error(code, payload)
        body = json.loads(payload)
        return body if isinstance(body, dict) else None

    async def delete_jobwatch(self, ref: ObjectRef, resource_version: str) -> bool:
        """Deletes the JobWatch only if it is still the object `ref` names (its uid) at
        `resource_version`, so that neither a namesake created since nor an edit made
        since is deleted: True when deleted (or its deletion started), False when there
        was nothing to delete (404); an ApiError (409 when a precondition failed)."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": ref.uid, "resourceVersion": resource_version},
        }
        code, payload = await self._client.request(
            "DELETE",
            f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{PLURAL}/{ref.name}",
            body=encode_json(options).encode(),
        )
        if code == 404:
            return False
        if code >= 400:
            raise api_error(code, payload)
        return True

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        """The Secret; None when it does not exist; FORBIDDEN_SECRET when the operator's
        RBAC does not let it read it."""
        code, payload = await self._client.request(
            "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
        )
        if code == 403:
            return FORBIDDEN_SECRET
        if code == 404:
            return None
        if code >= 400:
            raise api_error(code, payload)
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
            "reportingInstance": self._instance,
            "firstTimestamp": first,
            "lastTimestamp": now,
            "count": count,
        }
        code, body = await self._client.request(
            "POST", f"/api/v1/namespaces/{ref.namespace}/events", body=encode_json(event).encode()
        )
        if code >= 400:
            raise api_error(code, body)

    # --- Leases (control/sharding/): the buckets replicas share, and one per replica ---------

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
        code, answer = await self._client.request(method, path, body=payload, params=params)
        if code >= 400:
            raise api_error(code, answer)
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
        code, answer = await self._client.request("DELETE", f"{self._leases(namespace)}/{name}")
        if code >= 400 and code != 404:
            raise api_error(code, answer)


def _selector(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels)
