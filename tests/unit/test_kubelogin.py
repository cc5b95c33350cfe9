"""Logging in (kube/login.py): where the credentials come from, and what they allow: a
server URL, TLS settings or a proxy we cannot use stop the login rather than connect
unsafely. Requests go to a loopback stand-in for the API server (loopback_api.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
from loopback_api import LoopbackApi

from jobwatch.kube import login as kubelogin
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import Unreachable

SETTINGS = kopf.OperatorSettings()


def kubeconfig(tmp_path: Path, user: dict[str, Any], ca: str = "") -> Path:
    cluster: dict[str, Any] = {"server": "https://127.0.0.1:6443"}
    if ca:
        cluster["certificate-authority"] = ca
    path = tmp_path / "config"
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.fixture
def outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Not in a pod; records when the `kubernetes` package's login is asked instead."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    asked: list[str] = []

    def via_client(**_: Any) -> kopf.ConnectionInfo:
        asked.append("kubernetes")
        return kopf.ConnectionInfo(server="https://from-the-kubernetes-package")

    monkeypatch.setattr(kopf, "login_via_client", via_client)
    return asked


def test_a_kubeconfig_with_a_token_needs_no_kubernetes_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outside_a_pod: list[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, {"token": "t0k"})))
    info = kubelogin.login(SETTINGS)
    assert (info.server, info.token) == ("https://127.0.0.1:6443", "t0k")
    assert outside_a_pod == []


@pytest.mark.parametrize(
    ("user", "ca"),
    [
        ({"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}}, ""),
        ({"tokenFile": "/var/run/token"}, ""),
        ({"token": "t0k"}, "ca.crt"),  # relative to the kubeconfig's folder
    ],
)
def test_a_kubeconfig_kopfs_loader_cannot_use_goes_to_the_kubernetes_package(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outside_a_pod: list[str],
    user: dict[str, Any],
    ca: str,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, user, ca)))
    assert kubelogin.login(SETTINGS).server == "https://from-the-kubernetes-package"
    assert outside_a_pod == ["kubernetes"]


def test_in_a_pod_the_service_address_and_account_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.setattr(kubelogin, "SERVICE_ACCOUNT", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(
        kopf,
        "login_with_service_account",
        lambda **_: kopf.ConnectionInfo(server="https://kubernetes.default.svc", token="sa-token"),
    )
    info = kubelogin.login(SETTINGS)
    assert (info.server, info.token) == ("https://[fd00::1]:443", "sa-token")


async def test_a_kubeconfig_user_and_password_log_in_with_basic_auth(server: LoopbackApi) -> None:
    info = kopf.ConnectionInfo(server=server.server, username="ann", password="s3:cret")
    api = KubeApi(lambda: info)
    try:
        await api.delete_lease("ns", "bucket-0")
    finally:
        await api.aclose()
    expected = "Basic " + base64.b64encode(b"ann:s3:cret").decode()
    assert server.seen[-1].headers["authorization"] == expected


async def test_a_capitalised_https_scheme_still_speaks_tls() -> None:
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(64)
        if not first.done():
            first.set_result(data)
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for scheme in ("HTTPS", "Https"):
            info = kopf.ConnectionInfo(
                server=f"{scheme}://127.0.0.1:{port}", token="s3cret-token", insecure=True
            )
            api = KubeApi(lambda info=info: info)
            try:
                with pytest.raises(Unreachable):
                    await api.get_secret("ns", "creds")
            finally:
                await api.aclose()
            data = await asyncio.wait_for(first, 5)
            assert data[:1] == b"\x16"  # a TLS handshake record, not a request in clear text
            assert b"s3cret-token" not in data
            first = asyncio.get_running_loop().create_future()
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize(
    ("server", "field"),
    [
        ("ftp://127.0.0.1:6443", "`server`"),
        ("127.0.0.1:6443", "`server`"),
        ("https://", "`server`"),
    ],
)
def test_a_server_url_we_cannot_use_stops_the_login(server: str, field: str) -> None:
    with pytest.raises(kopf.LoginError, match=field):
        KubeApi(lambda: kopf.ConnectionInfo(server=server, token="t"))


def test_an_unusable_ca_stops_the_login_instead_of_connecting(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t", ca_path=str(bad))
    with pytest.raises(kopf.LoginError, match="certificate-authority"):
        KubeApi(lambda: info)


def test_a_socks_proxy_stops_the_login() -> None:
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443", token="t", insecure=True, proxy_url="socks5://p:1080"
    )
    with pytest.raises(kopf.LoginError, match="proxy-url"):
        KubeApi(lambda: info)


async def test_the_kubeconfigs_proxy_url_carries_the_requests(server: LoopbackApi) -> None:
    # The loopback server plays the proxy: a plain-HTTP API server's requests reach it
    # in absolute form, naming a host that does not resolve.
    info = kopf.ConnectionInfo(server="http://api.invalid:6443", token="t", proxy_url=server.server)
    api = KubeApi(lambda: info)
    try:
        assert await api.get_secret("ns", "creds") is not None
    finally:
        await api.aclose()
    assert server.seen[-1].headers["host"] == "api.invalid:6443"
    assert server.seen[-1].path == "/api/v1/namespaces/ns/secrets/creds"


async def test_the_environments_proxy_counts_only_when_trusted(
    server: LoopbackApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", server.server)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    for trusted, bypassed, reaches in [
        (True, False, True),
        (False, False, False),
        (True, True, False),
    ]:
        if bypassed:
            monkeypatch.setenv("NO_PROXY", "api.invalid")
        info = kopf.ConnectionInfo(server="http://api.invalid:6443", token="t", trust_env=trusted)
        api = KubeApi(lambda info=info: info, deadline=3)
        before = len(server.seen)
        try:
            if reaches:
                await api.get_secret("ns", "creds")
            else:
                with pytest.raises(Unreachable):
                    await api.get_secret("ns", "creds")
        finally:
            await api.aclose()
        assert len(server.seen) - before == (1 if reaches else 0)


def test_an_unusable_server_url_stops_the_operator_naming_the_field(tmp_path: Path) -> None:
    # No cluster is needed: the login is refused before any connection is made.
    config = tmp_path / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "ftp://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "s3cret-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {
        **os.environ,
        "KUBECONFIG": str(config),
        "JOBWATCH_HEALTH_PORT": "0",
        "JOBWATCH_METRICS_PORT": "0",
    }
    ran = subprocess.run(
        [sys.executable, "-m", "jobwatch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode != 0
    assert "failed permanently: cannot use the cluster's credentials" in ran.stderr
    assert "kubeconfig `server`" in ran.stderr
    assert "s3cret-token" not in ran.stderr
