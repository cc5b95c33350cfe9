"""The cost of user-written expressions is bounded: over-budget ones fail at compile,
naming the limit, and the functions with super-linear implementations are replaced."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from typing import Any

import pytest

from jobwatch.core.expressions import (
    MAX_BODY_VALUES,
    Cel,
    CompiledWatch,
    EvaluationError,
    ExpressionError,
    final_result,
)
from jobwatch.core.outcome import Response
from jobwatch.core.spec import parse_spec


def compiled(**fields: Any) -> CompiledWatch:
    return Cel().compile(parse_spec({"url": "http://svc/x", **fields}))


def response(body: Any = None, text: str | None = None) -> Response:
    raw = json.dumps(body) if text is None else text
    return Response(code=200, headers={}, text=raw, latency_ms=1)


def test_comprehensions_nested_three_deep_are_rejected() -> None:
    nested = "response.body.a.all(x, response.body.a.all(y, response.body.a.all(z, true)))"
    with pytest.raises(ExpressionError) as caught:
        compiled(successWhen=nested)
    assert str(caught.value) == (
        "spec.successWhen: comprehensions nested 3 deep; at most 2 are allowed"
    )


@pytest.mark.parametrize(
    "expression",
    [
        # two nested comprehensions over the response: 10^4 x 10^4 steps
        "response.body.a.all(x, response.body.a.exists(y, x == y))",
        # doubling a 1 MiB string in a chain of maps
        "[response.text].map(x, x + x).map(x, x + x).map(x, x + x).size() > 0",
        "size(" + " + ".join(["response.text"] * 40) + ") > 0",
    ],
)
def test_expressions_over_the_cost_budget_are_rejected(expression: str) -> None:
    with pytest.raises(ExpressionError, match=r"^spec\.failureWhen: estimated cost \d+ exceeds"):
        compiled(failureWhen=expression)


def test_the_result_expressions_are_checked_too() -> None:
    with pytest.raises(ExpressionError, match=r"^spec\.result\.r: comprehensions nested 3"):
        compiled(result={"r": "[1].map(a, [1].map(b, [1].map(c, c)))"})


@pytest.mark.parametrize(
    "expression",
    [
        'response.body.status == "COMPLETED"',
        "response.code >= 200 && response.code < 300",
        'response.body.items.all(i, i.state == "DONE")',
        'response.body.items.exists(i, i.tags.exists(t, t == "x"))',
        'response.text.contains("done") && response.text.matches("^ok")',
        'response.body.files.map(f, f.url + "?x").size() > 0',
    ],
)
def test_ordinary_expressions_are_within_budget(expression: str) -> None:
    compiled(successWhen=expression)


def test_a_body_with_too_many_values_is_an_evaluation_error_not_work() -> None:
    watch = compiled(successWhen="size(response.body.items) > 0")
    big = response({"items": list(range(MAX_BODY_VALUES + 1))})
    with pytest.raises(EvaluationError, match=f"more than {MAX_BODY_VALUES} JSON values"):
        watch.judge(big)
    assert watch.judge(response({"items": [1]})) == (False, True)


def test_a_large_body_is_fine_when_no_expression_reads_it() -> None:
    watch = compiled(successWhen='response.text.contains("x")')
    assert watch.judge(response({"items": list(range(MAX_BODY_VALUES * 2))})) == (False, False)


@pytest.mark.parametrize(
    "expression",
    [
        'duration("' + "a" * 40 + '!") == duration("1s")',
        'timestamp("' + "1" * 100 + '") == timestamp("2026-01-01T00:00:00Z")',
        'duration(response.text) > duration("1s")',
        '"' + "a" * 40 + '!".matches("(a+)+$")',
    ],
)
def test_time_and_regex_functions_are_linear(expression: str) -> None:
    watch = compiled(successWhen=expression)
    started = time.perf_counter()
    with contextlib.suppress(EvaluationError):
        watch.judge(response(text="a" * 100_000 + "!"))
    assert time.perf_counter() - started < 0.5  # exponential: hours


def test_durations_and_timestamps_still_parse() -> None:
    watch = compiled(
        successWhen='duration("1h2m3.5s") > duration("90s")'
        ' && timestamp("2026-01-02T03:04:05Z") > timestamp("2025-01-01T00:00:00Z")'
    )
    assert watch.judge(response({})) == (False, True)


@pytest.mark.parametrize("body", [{"x": float("nan")}, {"x": float("inf")}, [float("-inf")]])
def test_the_final_result_is_always_writable_json(body: Any) -> None:
    resp = Response(code=200, headers={}, text="{}", latency_ms=1, _json=body)
    value, note = final_result(compiled(), resp)
    json.dumps(value, allow_nan=False)
    assert note == "result omitted: not representable as JSON"


def test_a_large_body_is_judged_on_the_fields_the_conditions_read() -> None:
    """Only the top-level fields the conditions read are converted: a big log next to
    `status` neither slows the verdict down nor runs into MAX_BODY_VALUES."""
    spec = parse_spec(
        {
            "url": "http://a/",
            "successWhen": 'response.body.status == "DONE"',
            "result": {"link": "response.body.link"},
        }
    )
    compiled = Cel().compile(spec)
    body = {"status": "DONE", "link": "s3://r", "log": list(range(MAX_BODY_VALUES * 5))}
    started = time.perf_counter()
    assert compiled.judge(response(body)) == (False, True)
    assert time.perf_counter() - started < 0.05
    assert final_result(compiled, response(body)) == ({"link": "s3://r"}, None)


async def test_an_iterating_expression_does_not_hold_the_event_loop() -> None:
    """Within the budget an expression may iterate for a long time at cel-python's speed;
    it runs on the evaluator thread while the event loop keeps ticking."""
    compiled_watch = compiled(
        successWhen="response.body.l.exists(x, x == -1)",
        result={"n": "response.body.l.filter(x, x > 5).size()"},
    )
    big = response({"l": list(range(MAX_BODY_VALUES - 10))})
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.001)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # as the operator sets it (__main__.py)
    task = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await compiled_watch.prepare_verdict(big)
        await compiled_watch.prepare_result(big)
        elapsed = time.perf_counter() - started
    finally:
        task.cancel()
        sys.setswitchinterval(switch)
    assert compiled_watch.judge(big) == (False, False)  # picked up, not evaluated again
    assert final_result(compiled_watch, big) == ({"n": MAX_BODY_VALUES - 16}, None)
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    # On the loop, the evaluation would be one pause as long as itself, with no tick in
    # it. Off it, the loop ticks all along (longest pause about 6 ms on a quiet machine;
    # the bounds leave room for a busy one, whose scheduler also pauses the process).
    during = [t for t in ticks if started <= t <= started + elapsed]
    assert len(during) >= 10, (len(during), elapsed)
    assert longest < elapsed / 3, (longest, elapsed)
