"""Logging in to the API server: finding the credentials, and what they say about how
to connect (layer: kube adapter).

In a pod, its ServiceAccount's credentials; elsewhere, the current kubeconfig context.
What the credentials say (the server URL, TLS, the authorization header, a proxy) is
checked here, once at start-up and again at each re-login, and fails closed: never a
connection in clear text or unverified by mistake.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import kopf

# Where a ServiceAccount's credentials are mounted in a pod.
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

log = logging.getLogger(__name__)


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
    client_settings(info)  # a server, proxy or TLS setting we cannot use stops the start here
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


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the API server with one login's credentials."""

    server: httpx.URL
    verify: ssl.SSLContext | bool
    auth: Mapping[str, str] = dataclasses.field(repr=False)  # the authorization header
    proxy: str | None
    trust_env: bool


def client_settings(info: kopf.ConnectionInfo) -> ClientSettings:
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
    auth: dict[str, str] = {}
    if info.token:
        auth["authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    elif info.username and info.password:
        credentials = f"{info.username}:{info.password}".encode()
        auth["authorization"] = "Basic " + base64.b64encode(credentials).decode()
    # HTTPS_PROXY, NO_PROXY: only when kopf's settings say the environment counts.
    return ClientSettings(server, verify, auth, info.proxy_url, info.trust_env)


def _scheme(url: str) -> str | None:
    try:
        return httpx.URL(url).scheme
    except (httpx.InvalidURL, TypeError):
        return None
