"""Property-based tests: whatever a tenant writes or an endpoint sends, only the documented
errors come out, the next delay respects its floor and the deadline, and every status
the writer sends can be encoded for the API server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobwatch.control.status.writer import StatusWriter
from jobwatch.core import policy
from jobwatch.core.expressions import Cel, EvaluationError, ExpressionError, final_result
from jobwatch.core.outcome import FailureKind, RequestFailure, Response
from jobwatch.core.patch import Fence
from jobwatch.core.policy import ErrorClass, LastError, Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.core.spec import SpecError, WatchSpec, parse_spec
from jobwatch.core.watch import Watch
from jobwatch.kits.metrics import Metrics

NOW = 1_800_000_000.0
FIELDS = [
    *("url", "method", "headers", "body", "timeout", "interval", "requestTimeout", "backoff"),
    *("successWhen", "failureWhen", "result", "permanentStatusCodes"),
    *("maxConsecutiveErrors", "suspend", "tls"),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
durations = st.sampled_from(["100ms", "1s", "5s", "1m", "10m", "168h", "0", "-1s", "5", "x"])
raw_specs = st.fixed_dictionaries(
    {},
    optional={
        "url": st.sampled_from(["http://a/", "https://b:8443/x?y=1", "http://a]b/", "ftp://c/"])
        | st.text(max_size=30),
        "method": st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"]) | json_values,
        "timeout": durations | json_values,
        "interval": durations | json_values,
        "requestTimeout": durations,
        "backoff": st.fixed_dictionaries(
            {},
            optional={
                "factor": st.floats() | st.integers(),
                "maxInterval": durations,
                "jitter": st.sampled_from(["Full", "Equal", "None", "Other"]),
            },
        )
        | json_values,
        "headers": json_values,
        "result": json_values,
        "permanentStatusCodes": json_values,
        "maxConsecutiveErrors": json_values,
        "suspend": json_values,
        "tls": json_values,
    },
) | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_specs)
def test_spec_parsing_raises_only_spec_errors(raw: dict[str, Any]) -> None:
    try:
        spec = parse_spec(raw)
    except SpecError as error:
        assert str(error).startswith("spec")
        return
    assert spec.interval >= 0.1 and spec.timeout >= spec.interval


valid_specs = st.builds(
    lambda interval, timeout, factor, cap, jitter, errors: parse_spec(
        {
            "url": "http://jobs/x",
            "interval": interval,
            "timeout": timeout,
            "backoff": {"factor": factor, "maxInterval": cap, "jitter": jitter},
            "successWhen": 'response.body.status == "DONE"',
            "maxConsecutiveErrors": errors,
        }
    ),
    st.sampled_from(["100ms", "1s", "5s", "30s"]),
    st.sampled_from(["30s", "10m", "168h"]),
    st.floats(min_value=1, max_value=1e6),
    st.sampled_from(["100ms", "1s", "1m", "168h"]),
    st.sampled_from(["Full", "Equal", "None"]),
    st.integers(min_value=0, max_value=10),
)
responses = st.builds(
    Response,
    code=st.integers(min_value=100, max_value=599),
    headers=st.dictionaries(
        st.sampled_from(["retry-after", "content-type"]),
        st.sampled_from(["0", "1", "3600", "-5", "soon", "Fri, 15 Jan 2027 08:00:00 GMT"])
        | st.text(max_size=30),
        max_size=2,
    ),
    text=st.text(max_size=200)
    | st.sampled_from(['{"status": "DONE"}', '{"status": NaN}', "[" * 5000, '{"a": 1e999}']),
    latency_ms=st.just(1),
)
failures = st.builds(
    RequestFailure, kind=st.sampled_from(list(FailureKind)), message=st.text(max_size=50)
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    spec=valid_specs,
    outcome=responses | failures,
    errors=st.integers(min_value=0, max_value=10**6),
    left=st.floats(min_value=0, max_value=10**6),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_the_next_delay_keeps_its_floor_and_ends_by_the_deadline(
    spec: WatchSpec, outcome: Any, errors: int, left: float, rand: float
) -> None:
    decision = policy.decide(
        spec,
        Cel().compile(spec),
        outcome,
        errors,
        now=NOW,
        deadline=NOW + left,
        rand=lambda: rand,
    )
    if decision.finished:
        assert decision.delay is None
        return
    assert decision.delay is not None
    left = (NOW + left) - NOW  # as the policy sees it, in floating point
    assert 0 <= decision.delay <= left
    floor = policy.min_gap(spec) if decision.error is None else spec.interval
    assert decision.delay >= min(floor, left) - 1e-9


@given(
    spec=valid_specs,
    errors=st.integers(min_value=0, max_value=10**6),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
    error_class=st.sampled_from(list(ErrorClass)),
)
def test_errors_outside_the_response_back_off_from_the_interval(
    spec: WatchSpec, errors: int, rand: float, error_class: ErrorClass
) -> None:
    decision = policy.error(
        spec,
        errors,
        "InternalError",
        LastError(error_class, "m"),
        now=NOW,
        deadline=NOW + 1e6,
        rand=lambda: rand,
    )
    assert decision.finished or (decision.delay or 0) >= spec.interval


@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_a_response_body_never_raises(text: str) -> None:
    body = Response(code=200, headers={}, text=text, latency_ms=1).body
    json.dumps(body, allow_nan=False)  # whatever it is, the status can carry it


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    expression=st.text(max_size=60)
    | st.sampled_from(
        [
            "response.body.x.all(a, a > 0)",
            'duration("' + "a" * 40 + '!") > duration("1s")',
            "response.code",
            "[1,2].map(x, x + 1).size() > 0",
        ]
    ),
    body=json_values,
)
def test_expressions_raise_only_documented_errors(expression: str, body: Any) -> None:
    spec = {"url": "http://a/", "successWhen": expression or "true", "result": {"v": expression}}
    try:
        compiled = Cel().compile(parse_spec(spec))
    except (ExpressionError, SpecError):
        return
    try:
        text = json.dumps(body)
    except ValueError:
        text = "null"
    response = Response(code=200, headers={}, text=text, latency_ms=1)
    with contextlib.suppress(EvaluationError):
        compiled.judge(response)
    value, _ = final_result(compiled, response)
    json.dumps(value, allow_nan=False)


class EncodingApi:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        # The wire form: what the API server receives. Raises on NaN, Infinity.
        self.sent.append(json.dumps(status, allow_nan=False))

    async def create_event(self, ref: ObjectRef, **_: Any) -> None:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    phase=st.sampled_from(list(Phase)),
    attempts=st.integers(min_value=0, max_value=2**40),
    result=json_values,
    message=st.text(max_size=5000),
    offset=st.floats(min_value=-1e9, max_value=1e9),
)
def test_every_status_written_is_encodable(
    phase: Phase, attempts: int, result: Any, message: str, offset: float
) -> None:
    watch = Watch(
        ref=ObjectRef("ns", "w", "u"),
        generation=1,
        spec_hash="h",
        spec=None,
        compiled=None,
        suspended=False,
        start_time=NOW + offset,
        deadline=NOW + offset + 600,
        phase=phase,
        attempts=attempts,
        message=message,
        result=result,
        last_poll_time=NOW,
    )
    api = EncodingApi()
    writer = StatusWriter(
        api,  # type: ignore[arg-type]
        Metrics(),
        qps=1000,
        burst=1000,
        event_qps=1000,
        event_burst=1000,
        progress_interval=1,
        wall=lambda: NOW,
        clock=lambda: 0.0,
        identity="me",
    )
    writer.submit(watch, urgent=True)
    asyncio.run(writer.flush(1.0))
    (sent,) = api.sent
    status = json.loads(sent)
    assert status["phase"] == phase.value
    assert len(status["message"]) <= 32768
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in status.values())
