"""`spec` → WatchSpec: defaults, validation with field names, and the spec hash."""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType
from typing import Any

import pytest

from jobwatch.core.spec import (
    BackoffSpec,
    HeaderSpec,
    Jitter,
    SpecError,
    TLSSpec,
    WatchSpec,
    parse_spec,
    spec_hash,
)

URL = "http://reports.default.svc/api/jobs/42/status"


def spec(**fields: Any) -> dict[str, Any]:
    return {"url": URL, **fields}


def test_defaults_follow_the_api_contract() -> None:
    parsed = parse_spec({"url": URL})
    assert parsed == WatchSpec(
        url=URL,
        method="GET",
        headers=(),
        body=None,
        timeout=600.0,
        interval=5.0,
        request_timeout=30.0,
        backoff=BackoffSpec(factor=2.0, max_interval=60.0, jitter=Jitter.FULL),
        success_when="response.code >= 200 && response.code < 300",
        failure_when="false",
        result=(),
        permanent_status_codes=frozenset({400, 401, 403, 404, 405, 410, 422}),
        max_consecutive_errors=0,
        suspend=False,
        tls=TLSSpec(insecure_skip_verify=False, ca_secret_name=None, ca_secret_key=None),
    )


def test_explicit_nulls_mean_defaults() -> None:
    keys = [
        "method",
        "headers",
        "body",
        "timeout",
        "interval",
        "requestTimeout",
        "backoff",
        "successWhen",
        "failureWhen",
        "result",
        "permanentStatusCodes",
        "maxConsecutiveErrors",
        "suspend",
        "tls",
        "ttlSecondsAfterFinished",
    ]
    assert parse_spec(spec(**dict.fromkeys(keys))) == parse_spec({"url": URL})
    nested = spec(
        backoff={"factor": None, "maxInterval": None, "jitter": None},
        tls={"insecureSkipVerify": None, "caSecretRef": None},
    )
    assert parse_spec(nested) == parse_spec({"url": URL})


def test_every_field_is_read() -> None:
    parsed = parse_spec(
        {
            "url": "https://example.com:8443/x?y=1",
            "method": "POST",
            "headers": [
                {"name": "Accept", "value": "application/json"},
                {
                    "name": "Authorization",
                    "valueFrom": {"secretKeyRef": {"name": "token", "key": "bearer"}},
                },
            ],
            "body": '{"q": 1}',
            "timeout": "1h30m",
            "interval": "500ms",
            "requestTimeout": "2s",
            "backoff": {"factor": 1.5, "maxInterval": "30s", "jitter": "Equal"},
            "successWhen": 'response.body.status == "COMPLETED"',
            "failureWhen": 'response.body.status == "FAILED"',
            "result": {"link": "response.body.resultLink", "message": "response.body.message"},
            "permanentStatusCodes": [404, 410],
            "maxConsecutiveErrors": 5,
            "suspend": True,
            "tls": {"insecureSkipVerify": True, "caSecretRef": {"name": "ca", "key": "ca.crt"}},
            "ttlSecondsAfterFinished": 3600,
        }
    )
    assert parsed == WatchSpec(
        url="https://example.com:8443/x?y=1",
        method="POST",
        headers=(
            HeaderSpec("Accept", "application/json", None, None),
            HeaderSpec("Authorization", None, "token", "bearer"),
        ),
        body='{"q": 1}',
        timeout=5400.0,
        interval=0.5,
        request_timeout=2.0,
        backoff=BackoffSpec(factor=1.5, max_interval=30.0, jitter=Jitter.EQUAL),
        success_when='response.body.status == "COMPLETED"',
        failure_when='response.body.status == "FAILED"',
        result=(("link", "response.body.resultLink"), ("message", "response.body.message")),
        permanent_status_codes=frozenset({404, 410}),
        max_consecutive_errors=5,
        suspend=True,
        tls=TLSSpec(insecure_skip_verify=True, ca_secret_name="ca", ca_secret_key="ca.crt"),
        ttl_seconds_after_finished=3600,
    )


def test_result_keeps_spec_order() -> None:
    parsed = parse_spec(spec(result={"z": "1", "a": "2", "m": "3"}))
    assert [name for name, _ in parsed.result] == ["z", "a", "m"]


def test_an_empty_permanent_code_list_means_none() -> None:
    assert parse_spec(spec(permanentStatusCodes=[])).permanent_status_codes == frozenset()


def test_an_integer_factor_is_a_float() -> None:
    factor = parse_spec(spec(backoff={"factor": 3})).backoff.factor
    assert factor == 3.0
    assert isinstance(factor, float)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "HEAD"])
def test_each_method_is_accepted(method: str) -> None:
    assert parse_spec(spec(method=method)).method == method


@pytest.mark.parametrize("jitter", list(Jitter))
def test_each_jitter_is_accepted(jitter: Jitter) -> None:
    assert parse_spec(spec(backoff={"jitter": jitter.value})).backoff.jitter is jitter


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_body_with_post_and_put(method: str) -> None:
    assert parse_spec(spec(method=method, body="")).body == ""


@pytest.mark.parametrize(
    ("field", "text", "seconds"),
    [
        ("timeout", "1s", 1.0),
        ("timeout", "168h", 604800.0),
        ("interval", "100ms", 0.1),
        ("requestTimeout", "1ns", 1e-9),
        ("requestTimeout", "5m", 300.0),
    ],
)
def test_duration_bounds_are_inclusive(field: str, text: str, seconds: float) -> None:
    raw = spec(**{field: text, "interval": "100ms" if field != "interval" else text})
    parsed = parse_spec(raw)
    attribute = {"timeout": "timeout", "interval": "interval", "requestTimeout": "request_timeout"}
    assert getattr(parsed, attribute[field]) == pytest.approx(seconds)


def test_timeout_may_equal_interval() -> None:
    parsed = parse_spec(spec(timeout="5s", interval="5s"))
    assert parsed.timeout == parsed.interval == 5.0


def test_values_at_the_size_limits_are_accepted() -> None:
    parsed = parse_spec(
        spec(
            url="http://h/" + "x" * 2039,
            method="PUT",
            body="b" * 65536,
            headers=[{"name": "N" * 256, "value": "v" * 8192}] * 32,
            successWhen="true" + " " * 1020,
            result={f"r{i}": "1" for i in range(32)},
            permanentStatusCodes=list(range(400, 464)),
            maxConsecutiveErrors=2**31 - 1,
            tls={"caSecretRef": {"name": "a." + "b" * 251, "key": "K_e-y.1"}},
        )
    )
    assert len(parsed.url) == 2048
    assert len(parsed.headers) == 32
    assert len(parsed.result) == 32
    assert len(parsed.permanent_status_codes) == 64


def test_a_header_may_have_an_empty_value() -> None:
    assert parse_spec(spec(headers=[{"name": "X-Empty", "value": ""}])).headers == (
        HeaderSpec("X-Empty", "", None, None),
    )


def test_url_may_carry_a_port_and_ipv6_host() -> None:
    assert parse_spec(spec(url="http://[::1]:8080/x")).url == "http://[::1]:8080/x"


def test_any_mapping_is_accepted() -> None:
    # kopf hands the spec over as a read-only mapping view, not a dict.
    raw = MappingProxyType({"url": URL, "backoff": MappingProxyType({"factor": 4})})
    assert parse_spec(raw).backoff.factor == 4.0


def test_the_spec_is_frozen() -> None:
    parsed = parse_spec(spec())
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.interval = 1.0  # type: ignore[misc]


# Each row: the spec fields that are wrong, the field named, and the message.
BAD_SPECS: list[tuple[dict[str, Any], str, str]] = [
    ({"url": None}, "spec.url", "is required"),
    ({"url": ""}, "spec.url", "is required"),
    ({"url": 42}, "spec.url", "must be a string, not 42"),
    ({"url": "ftp://host/x"}, "spec.url", "must be an http:// or https:// URL"),
    ({"url": "reports.default.svc/x"}, "spec.url", "must be an http:// or https:// URL"),
    ({"url": "http:///path"}, "spec.url", "has no host"),
    ({"url": "http://user:pw@/x"}, "spec.url", "has no host"),
    ({"url": "http://host:99999/"}, "spec.url", "has an invalid port"),
    ({"url": "http://host:port/"}, "spec.url", "has an invalid port"),
    ({"url": "http://ho st/"}, "spec.url", "must not contain spaces or control characters"),
    ({"url": "http://host/\n"}, "spec.url", "must not contain spaces or control characters"),
    ({"method": "get"}, "spec.method", '"get" is not one of GET, POST, PUT, HEAD'),
    ({"method": "DELETE"}, "spec.method", '"DELETE" is not one of GET, POST, PUT, HEAD'),
    ({"body": "x"}, "spec.body", "a body is only sent with POST or PUT, not GET"),
    ({"body": "x", "method": "HEAD"}, "spec.body", "only sent with POST or PUT, not HEAD"),
    ({"body": {"a": 1}, "method": "POST"}, "spec.body", 'must be a string, not {"a": 1}'),
    (
        {"interval": "5 s"},
        "spec.interval",
        '"5 s" is not a duration (use Go form, e.g. 500ms, 5s, 1m30s)',
    ),
    ({"interval": 5}, "spec.interval", 'must be a duration string such as "5s", not 5'),
    ({"interval": "99ms"}, "spec.interval", '"99ms" is too short: must be at least 100ms'),
    ({"interval": "-1s"}, "spec.interval", "must not be negative"),
    ({"timeout": "999ms"}, "spec.timeout", '"999ms" is too short: must be at least 1s'),
    ({"timeout": "168h1s"}, "spec.timeout", '"168h1s" is too long: must be at most 168h'),
    ({"timeout": "10d"}, "spec.timeout", "is not a duration"),
    ({"timeout": "2s", "interval": "3s"}, "spec.timeout", "2s is shorter than spec.interval (3s)"),
    (
        {"timeout": "1m", "interval": "61s"},
        "spec.timeout",
        "1m is shorter than spec.interval (1m1s)",
    ),
    ({"interval": "11m"}, "spec.timeout", "10m is shorter than spec.interval (11m)"),
    ({"requestTimeout": "0s"}, "spec.requestTimeout", '"0s" is too short: must be at least 1ns'),
    ({"requestTimeout": "0"}, "spec.requestTimeout", "must be at least 1ns"),
    ({"requestTimeout": True}, "spec.requestTimeout", "must be a duration string"),
    ({"backoff": []}, "spec.backoff", "must be an object, not []"),
    (
        {"backoff": {"factor": 0.5}},
        "spec.backoff.factor",
        "must be a number of at least 1, not 0.5",
    ),
    ({"backoff": {"factor": 0}}, "spec.backoff.factor", "at least 1, not 0"),
    ({"backoff": {"factor": "2"}}, "spec.backoff.factor", 'at least 1, not "2"'),
    ({"backoff": {"factor": True}}, "spec.backoff.factor", "at least 1, not true"),
    ({"backoff": {"factor": float("inf")}}, "spec.backoff.factor", "at least 1"),
    (
        {"backoff": {"maxInterval": "0s"}},
        "spec.backoff.maxInterval",
        '"0s" is too short: must be at least 100ms',
    ),
    ({"backoff": {"maxInterval": "1 m"}}, "spec.backoff.maxInterval", "is not a duration"),
    (
        {"backoff": {"jitter": "full"}},
        "spec.backoff.jitter",
        '"full" is not one of Full, Equal, None',
    ),
    ({"backoff": {"jitter": "Decorrelated"}}, "spec.backoff.jitter", "is not one of"),
    ({"successWhen": ""}, "spec.successWhen", "is required"),
    ({"successWhen": True}, "spec.successWhen", "must be a string, not true"),
    ({"failureWhen": 1}, "spec.failureWhen", "must be a string, not 1"),
    ({"result": ["a"]}, "spec.result", 'must be an object, not ["a"]'),
    ({"result": {"link": 1}}, "spec.result.link", "must be a string, not 1"),
    ({"result": {"link": ""}}, "spec.result.link", "is required"),
    ({"permanentStatusCodes": 404}, "spec.permanentStatusCodes", "must be a list, not 404"),
    (
        {"permanentStatusCodes": [404, "410"]},
        "spec.permanentStatusCodes[1]",
        'must be an HTTP status code (100-599), not "410"',
    ),
    ({"permanentStatusCodes": [99]}, "spec.permanentStatusCodes[0]", "not 99"),
    ({"permanentStatusCodes": [600]}, "spec.permanentStatusCodes[0]", "not 600"),
    ({"permanentStatusCodes": [True]}, "spec.permanentStatusCodes[0]", "not true"),
    ({"permanentStatusCodes": [404.0]}, "spec.permanentStatusCodes[0]", "not 404.0"),
    (
        {"maxConsecutiveErrors": -1},
        "spec.maxConsecutiveErrors",
        "must be an integer from 0 to 2147483647, not -1",
    ),
    ({"maxConsecutiveErrors": 1.5}, "spec.maxConsecutiveErrors", "not 1.5"),
    ({"maxConsecutiveErrors": 2**31}, "spec.maxConsecutiveErrors", "not 2147483648"),
    ({"url": "http://h/" + "x" * 2040}, "spec.url", "must be at most 2048 characters, not 2049"),
    ({"headers": [{"name": "a", "value": "1"}] * 33}, "spec.headers", "at most 32 items, not 33"),
    ({"headers": [{"name": "X" * 257, "value": "1"}]}, "spec.headers[0].name", "at most 256"),
    ({"headers": [{"name": "X", "value": "v" * 8193}]}, "spec.headers[0].value", "at most 8192"),
    ({"method": "POST", "body": "b" * 65537}, "spec.body", "must be at most 65536 characters"),
    ({"timeout": "1" * 63 + "ms"}, "spec.timeout", "must be at most 64 characters, not 65"),
    ({"successWhen": "t" * 1025}, "spec.successWhen", "must be at most 1024 characters"),
    ({"failureWhen": "t" * 1025}, "spec.failureWhen", "must be at most 1024 characters"),
    ({"result": {"r": "t" * 1025}}, "spec.result.r", "must be at most 1024 characters"),
    ({"result": {f"r{i}": "1" for i in range(33)}}, "spec.result", "at most 32 entries, not 33"),
    (
        {"permanentStatusCodes": list(range(400, 465))},
        "spec.permanentStatusCodes",
        "at most 64 items, not 65",
    ),
    (
        {
            "headers": [
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "My_Secret", "key": "k"}}}
            ]
        },
        "spec.headers[0].valueFrom.secretKeyRef.name",
        '"My_Secret" is not a valid Secret name',
    ),
    (
        {"headers": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}]},
        "spec.headers[0].valueFrom.secretKeyRef.key",
        '"a/b" is not a valid Secret key',
    ),
    (
        {"tls": {"caSecretRef": {"name": "-ca", "key": "ca.crt"}}},
        "spec.tls.caSecretRef.name",
        "not a valid Secret name",
    ),
    (
        {"tls": {"caSecretRef": {"name": "c" * 254, "key": "ca.crt"}}},
        "spec.tls.caSecretRef.name",
        "must be at most 253 characters",
    ),
    ({"maxConsecutiveErrors": "3"}, "spec.maxConsecutiveErrors", 'not "3"'),
    ({"maxConsecutiveErrors": False}, "spec.maxConsecutiveErrors", "not false"),
    ({"suspend": "true"}, "spec.suspend", 'must be true or false, not "true"'),
    ({"suspend": 1}, "spec.suspend", "must be true or false, not 1"),
    ({"headers": {"name": "a"}}, "spec.headers", "must be a list"),
    ({"headers": ["X-A: 1"]}, "spec.headers[0]", 'must be an object, not "X-A: 1"'),
    ({"headers": [{"value": "1"}]}, "spec.headers[0].name", "is required"),
    (
        {"headers": [{"name": "X A", "value": "1"}]},
        "spec.headers[0].name",
        '"X A" is not a valid HTTP header name',
    ),
    ({"headers": [{"name": "X-A:", "value": "1"}]}, "spec.headers[0].name", "not a valid"),
    ({"headers": [{"name": "X-\u00e9", "value": "1"}]}, "spec.headers[0].name", "not a valid"),
    ({"headers": [{"name": "X-A"}]}, "spec.headers[0]", "set exactly one of value and valueFrom"),
    (
        {
            "headers": [
                {"name": "A", "value": "1"},
                {
                    "name": "B",
                    "value": "1",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                },
            ]
        },
        "spec.headers[1]",
        "set exactly one of value and valueFrom",
    ),
    ({"headers": [{"name": "X-A", "value": 1}]}, "spec.headers[0].value", "must be a string"),
    (
        {"headers": [{"name": "X-A", "value": "a\r\nX-Injected: 1"}]},
        "spec.headers[0].value",
        "must not contain CR, LF or NUL characters",
    ),
    ({"headers": [{"name": "X-A", "value": "a\x00"}]}, "spec.headers[0].value", "must not contain"),
    (
        {"headers": [{"name": "X-A", "valueFrom": {}}]},
        "spec.headers[0].valueFrom.secretKeyRef",
        "is required",
    ),
    (
        {"headers": [{"name": "X-A", "valueFrom": "s"}]},
        "spec.headers[0].valueFrom",
        'must be an object, not "s"',
    ),
    (
        {"headers": [{"name": "X-A", "valueFrom": {"secretKeyRef": {"key": "k"}}}]},
        "spec.headers[0].valueFrom.secretKeyRef.name",
        "is required",
    ),
    (
        {"headers": [{"name": "X-A", "valueFrom": {"secretKeyRef": {"name": "s", "key": ""}}}]},
        "spec.headers[0].valueFrom.secretKeyRef.key",
        "is required",
    ),
    (
        {"tls": {"insecureSkipVerify": "yes"}},
        "spec.tls.insecureSkipVerify",
        'must be true or false, not "yes"',
    ),
    ({"tls": {"caSecretRef": {"name": "ca"}}}, "spec.tls.caSecretRef.key", "is required"),
    ({"tls": {"caSecretRef": "ca"}}, "spec.tls.caSecretRef", 'must be an object, not "ca"'),
    ({"tls": True}, "spec.tls", "must be an object, not true"),
    (
        {"ttlSecondsAfterFinished": -1},
        "spec.ttlSecondsAfterFinished",
        "must be an integer from 0 to 2147483647, not -1",
    ),
    (
        {"ttlSecondsAfterFinished": 2**31},
        "spec.ttlSecondsAfterFinished",
        "must be an integer from 0 to 2147483647",
    ),
    ({"ttlSecondsAfterFinished": 1.5}, "spec.ttlSecondsAfterFinished", "not 1.5"),
    ({"ttlSecondsAfterFinished": "1h"}, "spec.ttlSecondsAfterFinished", 'not "1h"'),
    ({"ttlSecondsAfterFinished": True}, "spec.ttlSecondsAfterFinished", "not true"),
]


@pytest.mark.parametrize(("fields", "field", "message"), BAD_SPECS)
def test_invalid_specs_name_the_field(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec(**fields))
    assert caught.value.field == field
    assert message in caught.value.message
    assert str(caught.value) == f"{field}: {caught.value.message}"


def test_spec_error_text_matches_the_documented_form() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec(interval="5 s"))
    assert str(caught.value) == (
        'spec.interval: "5 s" is not a duration (use Go form, e.g. 500ms, 5s, 1m30s)'
    )


def test_a_missing_spec_needs_a_url() -> None:
    with pytest.raises(SpecError, match=r"^spec\.url: is required$"):
        parse_spec({})


def test_a_spec_that_is_not_an_object() -> None:
    with pytest.raises(SpecError, match=r"^spec: must be an object"):
        parse_spec(["url"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "http://user:s3cret@/x"},
        {"url": "ftp://user:s3cret@host/x"},
        {"headers": [{"name": "Authorization", "value": "Bearer s3cret\n"}]},
        {
            "headers": [
                {
                    "name": "Authorization",
                    "value": "s3cret",
                    "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"}},
                }
            ]
        },
    ],
)
def test_messages_never_repeat_urls_or_header_values(fields: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec(**fields))
    assert "s3cret" not in str(caught.value)


def test_long_values_are_cut_in_messages() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec(method="X" * 500))
    assert len(str(caught.value)) < 150


# --- spec_hash --------------------------------------------------------------


def test_hash_is_short_hex_and_stable() -> None:
    digest = spec_hash(spec())
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert spec_hash(spec()) == digest
    assert spec_hash(dict(reversed(list(spec(interval="1s", method="PUT").items())))) == spec_hash(
        spec(method="PUT", interval="1s")
    )


def test_hash_never_changes_between_versions() -> None:
    # status.specHash written by any earlier version must still match, or an upgraded
    # operator would take every running watch for a new one (new deadline, attempts 0).
    assert spec_hash(spec()) == "a88acdc9da382143"
    everything = spec(
        method="POST",
        body="x",
        headers=[
            {"name": "A", "value": "1"},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
        result={"b": "response.code", "a": "1"},
        permanentStatusCodes=[500, 404],
        tls={"insecureSkipVerify": True},
        backoff={"jitter": "Equal", "factor": 3},
    )
    assert spec_hash(everything) == "6581eccac3ce04a6"


@pytest.mark.parametrize("suspend", [True, False, None])
def test_hash_ignores_suspend(suspend: bool | None) -> None:
    assert spec_hash(spec(suspend=suspend)) == spec_hash(spec())


@pytest.mark.parametrize("ttl", [0, 2, 3600, 2**31 - 1, None])
def test_hash_ignores_the_ttl(ttl: int | None) -> None:
    # A change of the TTL alone is the same watch (as a Job's TTL is mutable): a finished
    # watch is not re-run for it, and the hashes stored before the field existed hold.
    assert spec_hash(spec(ttlSecondsAfterFinished=ttl)) == spec_hash(spec())


@pytest.mark.parametrize("ttl", [0, 1, 2**31 - 1])
def test_the_ttl_is_read_within_int32(ttl: int) -> None:
    assert parse_spec(spec(ttlSecondsAfterFinished=ttl)).ttl_seconds_after_finished == ttl


def test_hash_equals_with_defaults_spelled_out() -> None:
    spelled_out = spec(
        method="GET",
        headers=[],
        timeout="10m",
        interval="5s",
        requestTimeout="30s",
        backoff={"factor": 2, "maxInterval": "1m", "jitter": "Full"},
        successWhen="response.code >= 200 && response.code < 300",
        failureWhen="false",
        permanentStatusCodes=[422, 410, 405, 404, 403, 401, 400],
        maxConsecutiveErrors=0,
        suspend=False,
        tls={"insecureSkipVerify": False},
    )
    assert spec_hash(spelled_out) == spec_hash(spec())


def test_hash_equals_for_equivalent_spellings() -> None:
    assert spec_hash(spec(timeout="600s", interval="5000ms")) == spec_hash(spec())
    assert spec_hash(spec(backoff={"factor": 2.0})) == spec_hash(spec())
    assert spec_hash(spec(result={"a": "1", "b": "2"})) == spec_hash(
        spec(result={"b": "2", "a": "1"})
    )
    assert spec_hash(spec(permanentStatusCodes=[404, 404])) == spec_hash(
        spec(permanentStatusCodes=[404])
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"url": URL + "?x"},
        {"method": "POST"},
        {"method": "POST", "body": "x"},
        {"headers": [{"name": "A", "value": "1"}]},
        {"headers": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        {"timeout": "11m"},
        {"interval": "6s"},
        {"requestTimeout": "31s"},
        {"backoff": {"factor": 3}},
        {"backoff": {"maxInterval": "2m"}},
        {"backoff": {"jitter": "None"}},
        {"successWhen": "true"},
        {"failureWhen": "true"},
        {"result": {"a": "1"}},
        {"permanentStatusCodes": []},
        {"maxConsecutiveErrors": 3},
        {"tls": {"insecureSkipVerify": True}},
        {"tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}}},
    ],
)
def test_hash_changes_with_any_other_field(fields: dict[str, Any]) -> None:
    assert spec_hash(spec(**fields)) != spec_hash(spec())


def test_hash_of_an_invalid_spec_raises() -> None:
    with pytest.raises(SpecError):
        spec_hash(spec(interval="soon"))
