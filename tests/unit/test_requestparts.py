"""The parts of a watch's request that Secrets hold (requestparts.py): header values and a
CA bundle read through the Secret cache, only from Secrets labelled for it, and the
request built from them."""

from __future__ import annotations

import pytest

from jobwatch.control.requestparts import ALLOW_LABEL, PartsReader, SecretProblem
from jobwatch.core.refs import ObjectRef
from jobwatch.core.spec import parse_spec
from jobwatch.core.watch import Watch
from jobwatch.jobservice.client import Request, TLSSettings
from jobwatch.kube.api import FORBIDDEN_SECRET, Secret
from jobwatch.kube.secrets import SecretCache, SecretUnavailable

ALLOWED = {ALLOW_LABEL: "true"}
SPEC = {
    "url": "http://jobs.test/w",
    "method": "POST",
    "body": "{}",
    "headers": [
        {"name": "X-Plain", "value": "1"},
        {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
    ],
    "tls": {"caSecretRef": {"name": "s", "key": "ca.crt"}},
}


class Api:
    """The API server's Secrets."""

    def __init__(self, secrets: dict[str, Secret]) -> None:
        self.secrets = secrets

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        return self.secrets.get(name)


class BrokenCache:
    async def get(self, namespace: str, name: str) -> Secret | None:
        raise RuntimeError("inside the cache")


def watch(spec: dict[str, object] = SPEC) -> Watch:
    parsed = parse_spec(spec)
    return Watch(ObjectRef("ns", "w", "u"), 1, "h", parsed, None, False, 0.0, 60.0)


def reader(*secrets: tuple[str, Secret]) -> PartsReader:
    return PartsReader(SecretCache(Api(dict(secrets))))


async def test_values_from_a_secret_are_read_and_marked_sensitive() -> None:
    data = {"token": b" Bearer t \n", "ca.crt": b"PEM"}
    parts_reader = reader(("s", Secret(ALLOWED, data)))
    parts = await parts_reader.read(watch())
    assert parts.headers == (("X-Plain", "1"), ("Authorization", "Bearer t"))
    assert parts.sensitive == frozenset({"authorization"})
    assert parts.tls == TLSSettings(insecure_skip_verify=False, ca_pem="PEM")
    spec = watch().spec
    assert spec is not None
    assert parts.request(spec, 2.5) == Request(
        method="POST",
        url="http://jobs.test/w",
        headers=parts.headers,
        sensitive_headers=parts.sensitive,
        body=b"{}",
        timeout=2.5,
        tls=parts.tls,
    )


@pytest.mark.parametrize(
    ("secret", "reason", "said"),
    [
        (None, "SecretNotFound", "was not found in namespace ns"),
        (Secret({}, {"token": b"t"}), "SecretNotAllowed", f"lacks the label {ALLOW_LABEL}"),
        (Secret(ALLOWED, {}), "SecretNotFound", "has no key 'token'"),
        (FORBIDDEN_SECRET, "SecretNotAllowed", "its RBAC grants no get on Secrets here"),
    ],
    ids=["missing", "not-labelled", "no-key", "forbidden"],
)
async def test_a_secret_that_cannot_be_used_is_a_problem_the_watch_waits_for(
    secret: Secret | None, reason: str, said: str
) -> None:
    parts_reader = reader(*([("s", secret)] if secret is not None else []))
    with pytest.raises(SecretProblem) as problem:
        await parts_reader.read(watch())
    assert problem.value.reason == reason
    assert said in str(problem.value)


async def test_a_fault_of_the_cache_itself_is_only_unavailable() -> None:
    parts_reader = PartsReader(BrokenCache())  # type: ignore[arg-type]
    said = r"Secret 's' \(header Authorization\) could not be read \(RuntimeError\)"
    with pytest.raises(SecretUnavailable, match=said):
        await parts_reader.read(watch())
