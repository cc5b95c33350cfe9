"""TLS (API.md): verification on by default, a CA bundle from an opted-in Secret, or skip."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import JobServer, Namespace, Operator, Reply

ALLOW = {"jobwatch.dev/allow-use": "true"}
DONE = Reply(200, {"status": "COMPLETED"})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=jobwatch-e2e", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def secure_jobs(certificate: tuple[Path, Path]) -> Iterator[JobServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = JobServer(tls=context)
    yield server
    server.close()


def test_untrusted_certificate_is_a_transient_error(
    ns: Namespace, secure_jobs: JobServer, operator: Operator
) -> None:
    url = secure_jobs.script("/s", [DONE])
    ns.create("untrusted", {"url": url, "interval": "200ms"})
    status = ns.wait_status("untrusted", lambda s: s.get("lastError"), 10, "an error")
    assert status["phase"] == "Polling"
    assert status["lastError"]["class"] == "Transient"
    assert "certificate" in status["lastError"]["message"].lower()


def test_ca_bundle_from_an_opted_in_secret_is_trusted(
    ns: Namespace, secure_jobs: JobServer, operator: Operator, certificate: tuple[Path, Path]
) -> None:
    url = secure_jobs.script("/s", [DONE])
    ns.secret("job-ca", {"ca.crt": certificate[0].read_text()})
    ns.create(
        "pinned",
        {
            "url": url,
            "interval": "200ms",
            "tls": {"caSecretRef": {"name": "job-ca", "key": "ca.crt"}},
        },
    )
    waiting = ns.wait_status(
        "pinned", lambda s: s.get("reason") == "SecretNotAllowed", 10, "SecretNotAllowed"
    )
    assert "job-ca" in waiting["message"]
    assert secure_jobs.seen("/s") == []
    ns.secret("job-ca", {"ca.crt": certificate[0].read_text()}, labels=ALLOW)
    ns.wait_phase("pinned", "Succeeded")


def test_insecure_skip_verify_accepts_any_certificate(
    ns: Namespace, secure_jobs: JobServer, operator: Operator
) -> None:
    url = secure_jobs.script("/s", [DONE])
    ns.create("insecure", {"url": url, "tls": {"insecureSkipVerify": True}})
    ns.wait_phase("insecure", "Succeeded")
