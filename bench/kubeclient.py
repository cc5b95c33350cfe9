"""A small async Kubernetes client for the benchmark harness (aiohttp, admin kubeconfig).

Not the `kubernetes` package: that one is synchronous (a thread per request), and
the harness creates 10,000 objects with bounded concurrency and follows a watch of
all of them while staying out of the way of the operator it measures. What it
needs is a handful of calls: create, list, delete a collection, watch, and GET a
raw path (the API server's /metrics).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str | None
    ssl: ssl.SSLContext | bool


def load_kubeconfig(path: Path) -> Credentials:
    """The current context's server and credentials: a token, or a client certificate."""
    config = yaml.safe_load(path.read_text())
    contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
    context = contexts[config["current-context"]]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config.get("users") or []}.get(context["user"], {})

    def relative(name: str) -> str:
        return str((path.parent / name).resolve())

    context_ssl: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        context_ssl = False
    else:
        ca_data = cluster.get("certificate-authority-data")
        ca_file = cluster.get("certificate-authority")
        context_ssl = ssl.create_default_context(
            cafile=relative(ca_file) if ca_file else None,
            cadata=base64.b64decode(ca_data).decode() if ca_data else None,
        )
        cert_data, key_data = user.get("client-certificate-data"), user.get("client-key-data")
        if cert_data and key_data:
            # ssl loads client certificates from files only.
            with (
                tempfile.NamedTemporaryFile("wb", suffix=".crt") as cert,
                tempfile.NamedTemporaryFile("wb", suffix=".key") as key,
            ):
                cert.write(base64.b64decode(cert_data))
                key.write(base64.b64decode(key_data))
                cert.flush()
                key.flush()
                context_ssl.load_cert_chain(cert.name, key.name)
        elif user.get("client-certificate") and user.get("client-key"):
            context_ssl.load_cert_chain(
                relative(user["client-certificate"]), relative(user["client-key"])
            )
    token = user.get("token")
    if token is None and user.get("tokenFile"):
        token = Path(relative(user["tokenFile"])).read_text().strip()
    return Credentials(str(cluster["server"]).rstrip("/"), token, context_ssl)


class Kube:
    def __init__(self, credentials: Credentials, connections: int = 64) -> None:
        headers = {"user-agent": "jobwatch-bench"}
        if credentials.token:
            headers["authorization"] = f"Bearer {credentials.token}"
        self._server = credentials.server
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, ssl=credentials.ssl),
            headers=headers,
            # Deleting a collection of 10,000 objects is one long request.
            timeout=aiohttp.ClientTimeout(total=300),
        )

    async def aclose(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
    ) -> Any:
        async with self._session.request(
            method, self._server + path, json=body, params=params
        ) as response:
            text = await response.text()
            if response.status not in ok:
                raise KubeError(response.status, text[:300])
            return json.loads(text) if text else None

    async def patch(self, path: str, body: Any) -> Any:
        """A JSON merge patch (`request` sends JSON, which PATCH does not take)."""
        async with self._session.patch(
            self._server + path,
            data=json.dumps(body),
            headers={"content-type": "application/merge-patch+json"},
        ) as response:
            text = await response.text()
            if response.status != 200:
                raise KubeError(response.status, text[:300])
            return json.loads(text)

    async def text(self, path: str) -> str:
        async with self._session.get(self._server + path) as response:
            text = await response.text()
            if response.status != 200:
                raise KubeError(response.status, text[:300])
            return text

    async def list_all(self, path: str, page: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every item (paginated), and the list's resourceVersion to watch from."""
        items: list[dict[str, Any]] = []
        params = {"limit": str(page)}
        for _ in range(100_000):  # bounded: 50M objects
            listed = await self.request("GET", path, params=params)
            items.extend(listed.get("items") or [])
            token = listed["metadata"].get("continue")
            if not token:
                return items, str(listed["metadata"]["resourceVersion"])
            params = {"limit": str(page), "continue": token}
        raise RuntimeError(f"listing {path} did not end")

    async def count(self, path: str) -> int:
        items, _ = await self.list_all(path)
        return len(items)

    async def watch(self, path: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it.

        Lines are split by hand: aiohttp's readline refuses lines past its buffer
        size, and an object with a large status can be one.
        """
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "3600",
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self._session.get(
            self._server + path, params=params, timeout=timeout
        ) as response:
            if response.status != 200:
                raise KubeError(response.status, (await response.text())[:300])
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:end], buffer[end + 1 :]
                    if line.strip():
                        yield json.loads(line)
