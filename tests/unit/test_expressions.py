"""CEL expressions: compile errors, evaluation, CEL's error semantics, results and their cap."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from jobwatch.__main__ import quiet_libraries
from jobwatch.core.expressions import (
    Cel,
    CompiledWatch,
    EvaluationError,
    ExpressionError,
    excerpt,
    final_result,
)
from jobwatch.core.outcome import Response
from jobwatch.core.spec import parse_spec

JOB = {"status": "COMPLETED", "resultLink": "http://reports/42.pdf", "message": "done", "n": 3}


def compiled(**fields: Any) -> CompiledWatch:
    return Cel().compile(parse_spec({"url": "http://svc/x", **fields}))


def response(
    code: int = 200, body: Any = JOB, text: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        code=code,
        headers={"content-type": "application/json"} if headers is None else headers,
        text=json.dumps(body) if text is None else text,
        latency_ms=3,
    )


def success(expression: str, resp: Response) -> bool:
    watch = compiled(successWhen=expression)
    return watch.is_success(watch.activation(resp))


def value(expression: str, resp: Response | None = None) -> Any:
    watch = compiled(result={"v": expression})
    return watch.results(watch.activation(resp or response()))["v"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [(199, False), (200, True), (204, True), (299, True), (300, False), (503, False)],
)
def test_default_success_is_2xx(code: int, expected: bool) -> None:
    assert success("response.code >= 200 && response.code < 300", response(code)) is expected
    watch = compiled()
    assert watch.is_success(watch.activation(response(code))) is expected


def test_default_failure_is_never() -> None:
    watch = compiled()
    for code in (200, 404, 500):
        assert watch.is_failure(watch.activation(response(code))) is False


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("response.code", 201),
        ('response.headers["content-type"]', "application/json"),
        ('response.headers["x-request-id"]', "abc"),
        ("size(response.headers)", 2),
        ("response.body.status", "RUNNING"),
        ("response.body.n", 3),
        ("response.text", '{"status": "RUNNING", "n": 3}'),
    ],
)
def test_response_variables(expression: str, expected: Any) -> None:
    resp = Response(
        code=201,
        headers={"content-type": "application/json", "x-request-id": "abc"},
        text='{"status": "RUNNING", "n": 3}',
        latency_ms=3,
    )
    assert value(expression, resp) == expected


def test_body_is_null_when_not_json() -> None:
    resp = response(text="<html>busy</html>")
    assert success("response.body == null", resp) is True
    assert success('response.text.contains("busy")', resp) is True
    assert success("response.body == null", response(text="")) is True


@pytest.mark.parametrize(
    ("body", "expression"),
    [
        ([1, 2], "size(response.body) == 2"),
        ("RUNNING", 'response.body == "RUNNING"'),
        (7, "response.body == 7"),
        (True, "response.body"),
    ],
)
def test_body_may_be_any_json(body: Any, expression: str) -> None:
    assert success(expression, response(body=body)) is True


@pytest.mark.parametrize(
    ("expression", "kind"),
    [
        ("response.code", "int"),
        ("response.text", "string"),
        ("response.headers", "map"),
        ("[true]", "list"),
        ("1.5", "double"),
        ("null", "null"),
        ("1u", "uint"),
    ],
)
def test_a_condition_that_evidently_is_not_bool_is_rejected_at_compile(
    expression: str, kind: str
) -> None:
    for field in ("successWhen", "failureWhen"):
        with pytest.raises(ExpressionError) as caught:
            compiled(**{field: expression})
        assert str(caught.value) == f"spec.{field}: must evaluate to a bool, not {kind}"


@pytest.mark.parametrize(
    ("expression", "kind"),
    [("response.body.status", "string"), ("response.body", "map")],
)
def test_a_non_bool_result_known_only_from_the_response_is_an_evaluation_error(
    expression: str, kind: str
) -> None:
    watch = compiled(successWhen=expression, failureWhen=expression)
    activation = watch.activation(response())
    for check, field in (
        (watch.is_success, "spec.successWhen"),
        (watch.is_failure, "spec.failureWhen"),
    ):
        with pytest.raises(EvaluationError) as caught:
            check(activation)
        assert str(caught.value) == f"{field}: evaluated to {kind}, not a bool"
        assert caught.value.field == field


@pytest.mark.parametrize(
    ("expression", "resp", "detail"),
    [
        ('response.code == "200"', response(), "no matching overload"),
        ("response.code > 1.5", response(), "no matching overload"),
        (
            'response.body.status == "DONE"',
            response(text="<html>"),
            "cannot select a field of a null value",
        ),
        (
            'response.body.status == "DONE"',
            response(body="text"),
            "cannot select a field of a string value",
        ),
        ('response.body.state == "DONE"', response(), "no such member in mapping: 'state'"),
        ('response.headers["retry-after"] == "1"', response(), "no such key: retry-after"),
        ("[1, 2][5] == 1", response(), "invalid_argument: list index out of range"),
        ("1 / 0 == 1", response(), "divide by zero"),
        ("nosuchfunction(1)", response(), "undeclared reference to 'nosuchfunction'"),
        ("request.code == 1", response(), "undeclared reference to 'request'"),
    ],
)
def test_evaluation_errors_are_raised_with_a_short_detail(
    expression: str, resp: Response, detail: str
) -> None:
    with pytest.raises(EvaluationError) as caught:
        success(expression, resp)
    message = str(caught.value)
    assert message.startswith("spec.successWhen: ")
    assert detail in message
    assert "\n" not in message
    assert len(message) <= 240
    assert "<class" not in message


def test_error_details_do_not_copy_the_response() -> None:
    secret = "TOPSECRET-" + "x" * 50
    resp = response(body={"token": secret}, headers={"set-cookie": secret})
    for expression in ("nosuchfunction(1)", "unknownvar", "response.body.token == 1"):
        with pytest.raises(EvaluationError) as caught:
            success(expression, resp)
        assert "TOPSECRET" not in str(caught.value)


def test_evaluation_errors_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    quiet_libraries()  # as the operator sets its logs up at start-up
    with caplog.at_level(logging.WARNING), pytest.raises(EvaluationError):
        success('response.body.status == "x"', response(text="not json"))
    assert caplog.records == []


@pytest.mark.parametrize(
    ("expression", "resp", "expected"),
    [
        # CEL's && and || absorb an error when the other side decides the result.
        (
            'has(response.body.status) && response.body.status == "DONE"',
            response(text="<html>"),
            False,
        ),
        ('has(response.body.status) && response.body.status == "DONE"', response(body={}), False),
        (
            'has(response.body.status) && response.body.status == "DONE"',
            response(body={"status": "DONE"}),
            True,
        ),
        (
            'response.code == 404 || response.body.status == "FAILED"',
            response(404, text="<html>Not Found</html>"),
            True,
        ),
        (
            'response.body.status == "FAILED" || response.code == 404',
            response(404, text="<html>Not Found</html>"),
            True,
        ),
        (
            'response.code == 200 && response.body.status == "DONE"',
            response(503, text="oops"),
            False,
        ),
        (
            'response.body.status == "DONE" && response.code == 200',
            response(503, text="oops"),
            False,
        ),
        (
            'response.code != 200 ? false : response.body.status == "DONE"',
            response(503, text=""),
            False,
        ),
        ("has(response.body.nested.a)", response(text="[]"), False),
        ("response.body != null", response(text="<html>"), False),
    ],
)
def test_cel_error_semantics_guard_patterns(
    expression: str, resp: Response, expected: bool
) -> None:
    assert success(expression, resp) is expected


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("successWhen", "spec.successWhen"),
        ("failureWhen", "spec.failureWhen"),
        ("result", "spec.result.link"),
    ],
)
@pytest.mark.parametrize(
    ("expression", "where"),
    [
        ("response.code +", "at line 1, column 15"),
        ("(", "at line 1, column 1"),
        ("response.code == 200 &&\n  )", "at line 2, column 3"),
        ('"unterminated', "at line 1, column 1"),
        ("response..code", "at line 1, column 10"),
        ("response.?body", ""),
    ],
)
def test_syntax_errors_fail_at_compile_naming_the_field(
    field: str, name: str, expression: str, where: str
) -> None:
    fields: dict[str, Any] = (
        {"result": {"link": expression}} if field == "result" else {field: expression}
    )
    with pytest.raises(ExpressionError) as caught:
        compiled(**fields)
    message = str(caught.value)
    assert message.startswith(f"{name}: syntax error")
    assert where in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "expression",
    ["(" * 200 + "true" + ")" * 200, "!" * 200 + "true", "+".join(["1"] * 300) + " > 0"],
)
def test_overly_nested_expressions_fail_at_compile(expression: str) -> None:
    with pytest.raises(ExpressionError, match=r"^spec\.failureWhen: nested too deeply"):
        compiled(failureWhen=expression)


def test_watches_sharing_an_expression_share_the_program() -> None:
    cel = Cel()
    when = 'response.body.status == "SHARED"'
    first = cel.compile(
        parse_spec({"url": "http://svc/x", "successWhen": when, "result": {"a": "1"}})
    )
    second = cel.compile(
        parse_spec({"url": "http://svc/x", "successWhen": when, "result": {"b": "1"}})
    )
    assert first._success is second._success
    assert first._results[0][1] is second._results[0][1]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("response.body.n", 3),
        ("1u", 1),
        ("1.5", 1.5),
        ('"text"', "text"),
        ("true", True),
        ("has(response.body.n)", True),
        ("null", None),
        ("[1, 'a', null, [true]]", [1, "a", None, [True]]),
        ("{'a': {'b': [1.0]}}", {"a": {"b": [1.0]}}),
        ("{1: 'one', 2: 'two'}", {"1": "one", "2": "two"}),
        ("{true: 'yes'}", {"true": "yes"}),
        ("{2u: 'two'}", {"2": "two"}),
        ('b"hi"', "aGk="),
        ('timestamp("2026-01-02T03:04:05Z")', "2026-01-02T03:04:05Z"),
        ('duration("90s")', "90s"),
        ("1.0 / 0.0", None),
        ("response.body", JOB),
    ],
)
def test_results_are_plain_json(expression: str, expected: Any) -> None:
    result = value(expression)
    assert result == expected
    assert type(result) is type(expected)
    plain = json.loads(json.dumps(result, allow_nan=False))
    assert plain == expected


def test_results_keep_their_types_inside_containers() -> None:
    result = value("[1, 1.5, 'a', true, {'k': 2}]")
    assert [type(item) for item in result] == [int, float, str, bool, dict]
    assert type(result[4]["k"]) is int
    assert type(next(iter(result[4]))) is str


def test_a_failing_result_expression_yields_null_and_others_still_count() -> None:
    watch = compiled(
        result={
            "link": "response.body.resultLink",
            "bad": "response.body.nope",
            "code": "response.code",
        }
    )
    assert watch.results(watch.activation(response())) == {
        "link": "http://reports/42.pdf",
        "bad": None,
        "code": 200,
    }


def test_results_on_a_non_json_body() -> None:
    watch = compiled(result={"status": "response.body.status", "raw": "response.text"})
    assert watch.results(watch.activation(response(text="plain"))) == {
        "status": None,
        "raw": "plain",
    }


def test_final_result_uses_the_result_expressions() -> None:
    watch = compiled(
        result={"link": "response.body.resultLink", "message": "response.body.message"}
    )
    assert final_result(watch, response()) == (
        {"link": "http://reports/42.pdf", "message": "done"},
        None,
    )


def test_final_result_without_result_is_the_json_body() -> None:
    assert final_result(compiled(), response()) == (JOB, None)
    assert final_result(compiled(), response(body=[1, 2])) == ([1, 2], None)


@pytest.mark.parametrize("resp", [None, response(text="<html>"), response(text="")])
def test_final_result_is_empty_without_a_json_body(resp: Response | None) -> None:
    assert final_result(compiled(), resp) == (None, None)


def test_final_result_with_result_expressions_and_no_response() -> None:
    assert final_result(compiled(result={"a": "1"}), None) == (None, None)


def padded(size: int) -> dict[str, str]:
    """A JSON object of exactly `size` bytes when serialised compactly."""
    overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
    return {"p": "x" * (size - overhead)}


@pytest.mark.parametrize(
    ("size", "kept"), [(4095, True), (4096, True), (4097, False), (50000, False)]
)
def test_final_result_is_capped_at_4_kib(size: int, kept: bool) -> None:
    body = padded(size)
    result, note = final_result(compiled(), response(body=body))
    if kept:
        assert (result, note) == (body, None)
    else:
        assert result is None
        assert note == f"result omitted: {size} bytes exceeds the 4 KiB limit"


def test_the_cap_counts_bytes_not_characters() -> None:
    body = {"p": "\u00e9" * 2100}  # 2100 characters, 4200 bytes in UTF-8
    result, note = final_result(compiled(), response(body=body))
    assert result is None
    assert note == "result omitted: 4208 bytes exceeds the 4 KiB limit"


def test_the_cap_applies_to_result_expressions_and_can_be_changed() -> None:
    watch = compiled(result={"text": "response.text"})
    result, note = final_result(watch, response(text="y" * 200), max_bytes=100)
    assert result is None
    assert note == "result omitted: 211 bytes exceeds the 100 bytes limit"
    assert final_result(watch, response(text="y" * 80), max_bytes=100) == ({"text": "y" * 80}, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("short", "short"),
        ("  many\n\tlines \r\n here ", "many lines here"),
        ("x" * 200, "x" * 200),
        ("x" * 201, "x" * 199 + "…"),
        ("x" * 10_000_000, "x" * 199 + "…"),
        (" " * 500 + "tail", "…"),
    ],
)
def test_excerpt_is_one_short_line(text: str, expected: str) -> None:
    assert excerpt(text) == expected


def test_judge_reuses_the_verdict_only_for_an_identical_response() -> None:
    watch = compiled(
        successWhen='response.body.status == "COMPLETED"',
        failureWhen='response.body.status == "FAILED"',
    )
    pending = response(body={"status": "RUNNING"})
    assert watch.judge(pending) == (False, False)
    assert watch.judge(response(body={"status": "RUNNING"})) == (False, False)
    assert watch.judge(response(body={"status": "COMPLETED"})) == (False, True)
    assert watch.judge(response(body={"status": "FAILED"})) == (True, False)
    assert watch.judge(response(code=202, body={"status": "FAILED"})) == (True, False)
    broken = response(text="<html>")
    for _ in range(2):
        with pytest.raises(EvaluationError, match="cannot select a field of a null value"):
            watch.judge(broken)
    assert watch.judge(pending) == (False, False)


def test_judge_sees_header_changes_when_an_expression_reads_headers() -> None:
    watch = compiled(successWhen='response.headers["x-state"] == "done"')
    assert watch.judge(response(headers={"x-state": "busy"})) == (False, False)
    assert watch.judge(response(headers={"x-state": "done"})) == (False, True)


def test_judge_keys_on_the_body_fields_the_conditions_read() -> None:
    watch = compiled(
        successWhen='response.body.status == "COMPLETED"',
        failureWhen='has(response.body.error) && response.body.error != ""',
    )
    # progress changes at every poll; the verdict depends on status and error only
    assert watch.judge(response(body={"status": "RUNNING", "progress": 1})) == (False, False)
    assert watch.judge(response(body={"status": "RUNNING", "progress": 2})) == (False, False)
    assert watch.judge(response(body={"status": "COMPLETED", "progress": 3})) == (False, True)
    assert watch.judge(response(body={"status": "RUNNING", "error": "disk"})) == (True, False)
    assert watch.judge(response(body={"status": "RUNNING", "error": ""})) == (False, False)
    with pytest.raises(EvaluationError):
        watch.judge(response(body=["not", "a", "map"]))
    assert watch.judge(response(body={"status": "COMPLETED"})) == (False, True)


@pytest.mark.parametrize(
    "expression",
    [
        "response.body.size() > 0",  # the body as a whole
        'response.text.contains("done")',
        'response.headers["x-state"] == "done"',
        'response.body.status == "somebody"',  # "body" in a literal: not provable
    ],
)
def test_judge_falls_back_to_the_whole_response_when_unsure(expression: str) -> None:
    watch = compiled(successWhen=expression)
    assert watch._fields is None
