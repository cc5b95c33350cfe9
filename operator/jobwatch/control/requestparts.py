"""What a watch's request carries from Secrets (header values, a CA bundle), read for
each attempt, and the request built from them.

Layer: control (reads through the Secret cache of the `kube` adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

from jobwatch.control.watchbook import log
from jobwatch.core.spec import WatchSpec
from jobwatch.core.watch import Watch
from jobwatch.jobservice.client import Request, TLSSettings
from jobwatch.kube.secrets import SecretCache, SecretUnavailable

ALLOW_LABEL = "jobwatch.dev/allow-use"

Headers = tuple[tuple[str, str], ...]


class SecretProblem(Exception):
    """The Secret is missing or not allowed: the watch waits for it (no error counted)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestParts:
    headers: Headers
    sensitive: frozenset[str]  # the names (lower case) of headers whose value is secret
    tls: TLSSettings

    def request(self, spec: WatchSpec, timeout: float) -> Request:
        return Request(
            method=spec.method,
            url=spec.url,
            headers=self.headers,
            sensitive_headers=self.sensitive,
            body=spec.body.encode() if spec.body is not None else None,
            timeout=timeout,
            tls=self.tls,
        )


class PartsReader:
    """Reads the parts of a watch's request that its Secrets hold. Raises `SecretProblem`
    (the watch waits) or `SecretUnavailable` (a transient error)."""

    def __init__(self, secrets: SecretCache) -> None:
        self._secrets = secrets

    async def read(self, watch: Watch) -> RequestParts:
        headers, sensitive = await self._headers(watch)
        return RequestParts(headers, sensitive, await self._tls(watch))

    async def _secret_value(self, namespace: str, name: str, key: str, use: str) -> bytes:
        try:
            secret = await self._secrets.get(namespace, name)
        except SecretUnavailable:
            raise
        except Exception as exc:  # the cache's own fault: still only this watch's error
            log.error("reading Secret %s/%s failed", namespace, name, exc_info=exc)
            raise SecretUnavailable(
                f"Secret {name!r} ({use}) could not be read ({type(exc).__name__})"
            ) from None
        if secret is None:
            raise SecretProblem(
                "SecretNotFound", f"Secret {name!r} ({use}) was not found in namespace {namespace}"
            )
        if not secret.readable:
            raise SecretProblem(
                "SecretNotAllowed",
                f"the operator may not read Secret {name!r} ({use}) in namespace {namespace}:"
                " its RBAC grants no get on Secrets here (HTTP 403)",
            )
        if secret.labels.get(ALLOW_LABEL) != "true":
            raise SecretProblem(
                "SecretNotAllowed",
                f'Secret {name!r} ({use}) lacks the label {ALLOW_LABEL}: "true"',
            )
        if key not in secret.data:
            raise SecretProblem("SecretNotFound", f"Secret {name!r} ({use}) has no key {key!r}")
        return secret.data[key]

    async def _headers(self, watch: Watch) -> tuple[Headers, frozenset[str]]:
        assert watch.spec is not None
        headers: list[tuple[str, str]] = []
        sensitive: set[str] = set()
        for header in watch.spec.headers:
            if header.secret_name is None or header.secret_key is None:
                headers.append((header.name, header.value or ""))
                continue
            value = await self._secret_value(
                watch.ref.namespace,
                header.secret_name,
                header.secret_key,
                f"header {header.name}",
            )
            headers.append((header.name, value.decode(errors="replace").strip()))
            sensitive.add(header.name.lower())
        return tuple(headers), frozenset(sensitive)

    async def _tls(self, watch: Watch) -> TLSSettings:
        assert watch.spec is not None
        tls = watch.spec.tls
        ca_pem = None
        if tls.ca_secret_name and tls.ca_secret_key:
            ca = await self._secret_value(
                watch.ref.namespace, tls.ca_secret_name, tls.ca_secret_key, "tls.caSecretRef"
            )
            ca_pem = ca.decode(errors="replace")
        return TLSSettings(insecure_skip_verify=tls.insecure_skip_verify, ca_pem=ca_pem)
