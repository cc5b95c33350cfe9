"""CEL for `successWhen`, `failureWhen` and `result`: compiled once, evaluated per response.

Each distinct expression text is compiled once per process (a bounded cache), so 10k
watches sharing the default `successWhen` share one program.

Two cel-python runners are used together. The compiled runner (CEL transpiled to
Python) is six to seven times faster in our measurements, but in cel-python 0.5.0 it gets
CEL's error-absorbing `&&`, `||`, `?:` and `has()` wrong whenever a field is selected on a
value that is not a map: `has(response.body.status) && response.body.status == "DONE"`
raises on a non-JSON body instead of giving false. So it only answers when it succeeds
(it never returned a different value in our comparisons); when it raises, the interpreted
runner, which implements CEL's semantics, gives the authoritative value or error. The
common path is fast, and an error costs one more evaluation.

Programs are not thread-safe (the compiled runner keeps its activation in module
globals): evaluate from one thread, the event loop's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, Context

from jobwatch.outcome import Response
from jobwatch.spec import WatchSpec

# The compiled runner logs every evaluation error at ERROR, with values from the response
# in it; an expression that does not match a response is routine, not an operator fault.
logging.getLogger("celpy.Transpiler").setLevel(logging.CRITICAL)

# cel-python builds one process-wide parser with the tree class of the first Environment;
# the compiled runner needs its own tree class (which the interpreter accepts too), so
# this Environment must be the first one made.
_COMPILED = celpy.Environment(runner_class=celpy.CompiledRunner)
_INTERPRETED = celpy.Environment(runner_class=celpy.InterpretedRunner)

EXCERPT_LIMIT = 200
_CEL_CLASS = re.compile(r"<class '(?:celpy\.celtypes\.)?(\w+)'>")
_RULE_TOKEN = re.compile(r"Token\('RULE', '(\w+)'\)")
# Messages that say nothing without their argument (a key or index from the expression).
_NEEDS_ARGUMENT = frozenset({"no such key", "invalid_argument"})
# Starts with the value itself, which may be the whole response body.
_NO_FIELDS = re.compile(r".* with type: '(\w+)' does not support field selection", re.DOTALL)
# The interpreter appends its whole activation, response included, to some messages.
_ACTIVATION_DUMP = re.compile(r" \(in (?:activation|container) .*", re.DOTALL)


class ExpressionError(Exception):
    """An expression that does not compile; the watch fails with reason InvalidSpec."""


class EvaluationError(Exception):
    """An expression that cannot be evaluated on one response; str() names the field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Program:
    text: str
    fast: celpy.Runner
    exact: celpy.Runner

    def evaluate(self, field: str, activation: Context) -> celtypes.Value:
        try:
            return self.fast.evaluate(activation)
        except CELEvalError:
            pass  # the interpreter decides what the failure means
        try:
            return self.exact.evaluate(activation)
        except CELEvalError as error:
            raise EvaluationError(field, _describe(error)) from None
        except Exception as error:  # any crash of the evaluator is this response's problem
            raise EvaluationError(field, excerpt(f"{type(error).__name__}: {error}")) from None


@functools.lru_cache(maxsize=4096)
def _program(text: str) -> _Program:
    ast = _COMPILED.compile(text)
    return _Program(text=text, fast=_COMPILED.program(ast), exact=_INTERPRETED.program(ast))


def _compile(field: str, text: str) -> _Program:
    try:
        return _program(text)
    except CELParseError as error:
        where = f" at line {error.line}, column {error.column}" if error.line else ""
        raise ExpressionError(f"{field}: syntax error{where}: {excerpt(text)}") from None
    except (RecursionError, SyntaxError):
        # The parser and the transpiled Python both recurse once per nesting level.
        raise ExpressionError(f"{field}: nested too deeply to compile") from None


# Stand-in responses for a type check at compile time: cel-python has no static type
# checker, but an expression that evaluates on every one of these to something other
# than a bool (`response.code`, `response.text`) cannot be a condition, whatever the
# endpoint answers. One that fails on them, or gives a bool on any (`response.body`
# is a bool for a JSON `true`), is left to be judged on real responses.
_PROBE_BODIES: tuple[Any, ...] = (None, {}, True)
_PROBES: tuple[Context, ...] = tuple(
    {"response": json_to_cel({"code": 200, "headers": {}, "body": body, "text": ""})}
    for body in _PROBE_BODIES
)


@functools.lru_cache(maxsize=4096)
def _condition(field: str, text: str) -> _Program:
    program = _compile(field, text)
    kinds: set[str] = set()
    for probe in _PROBES:
        try:
            value = program.evaluate(field, probe)
        except EvaluationError:
            return program
        if isinstance(value, bool | celtypes.BoolType):
            return program
        kinds.add(_cel_name(type(value).__name__))
    raise ExpressionError(f"{field}: must evaluate to a bool, not {' or '.join(sorted(kinds))}")


_PARTS = frozenset({"headers", "body", "text"})
_CODE, _HEADERS, _BODY, _TEXT = (
    celtypes.StringType(k) for k in ("code", "headers", "body", "text")
)


def _mentioned(spec: WatchSpec) -> frozenset[str]:
    """The response parts the expressions may use. A plain substring test: it can only
    err towards converting a part that is not needed, never the other way round."""
    texts = [spec.success_when, spec.failure_when, *(text for _, text in spec.result)]
    return frozenset(part for part in _PARTS if any(part in text for text in texts))


# A field of the body; not a method called on it (`response.body.size()`).
_BODY_FIELD = re.compile(r"\bresponse\.body\.([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()")
_MISSING: Any = object()


def _body_fields(texts: list[str]) -> tuple[str, ...] | None:
    """The top-level body fields the conditions read, when that is all they read of the
    body and they read neither `text` nor `headers`; else None. Conservative: any other
    mention of "body" (even inside a string literal) or of the other parts gives None."""
    joined = "\n".join(texts)
    fields = _BODY_FIELD.findall(joined)
    if "text" in joined or "headers" in joined or joined.count("body") != len(fields):
        return None
    return tuple(sorted(set(fields)))


def _fingerprint(value: Any) -> object:
    if value is _MISSING:
        return ("missing",)
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return (type(value).__name__, value)  # 1, 1.0 and True must not match
    return ("json", json.dumps(value, sort_keys=True))


def _cel(value: Any) -> celtypes.Value:
    """Parsed JSON as CEL values: `celpy.json_to_cel`, without its costly isinstance
    checks against typing generics (exact JSON types only, which is all json gives)."""
    kind = type(value)
    if kind is str:
        return celtypes.StringType(value)
    if kind is bool:
        return celtypes.BoolType(value)
    if kind is int:
        return celtypes.IntType(value)
    if kind is float:
        return celtypes.DoubleType(value)
    if kind is dict:
        return celtypes.MapType({celtypes.StringType(k): _cel(v) for k, v in value.items()})
    if kind is list:
        return celtypes.ListType([_cel(item) for item in value])
    if value is None:
        return None
    return json_to_cel(value)


class CompiledWatch:
    """The compiled expressions of one `WatchSpec`."""

    __slots__ = ("_failure", "_fields", "_last", "_results", "_success", "_uses")

    def __init__(
        self,
        success: _Program,
        failure: _Program,
        results: tuple[tuple[str, _Program], ...],
        uses: frozenset[str] = _PARTS,
    ) -> None:
        self._success = success
        self._failure = failure
        self._results = results
        self._uses = uses
        self._last: tuple[tuple[object, ...], tuple[bool, bool] | EvaluationError] | None = None
        self._fields = _body_fields([success.text, failure.text])

    @classmethod
    def compile(cls, spec: WatchSpec) -> CompiledWatch:
        """Raises `ExpressionError` naming the field of an expression that does not compile
        (or, for the conditions, evidently does not evaluate to a bool)."""
        return cls(
            _condition("spec.successWhen", spec.success_when),
            _condition("spec.failureWhen", spec.failure_when),
            tuple((name, _compile(f"spec.result.{name}", text)) for name, text in spec.result),
            _mentioned(spec),
        )

    @property
    def has_results(self) -> bool:
        return bool(self._results)

    def activation(self, response: Response) -> Context:
        """The CEL variables for one response; build once, use for every expression.

        Converting to CEL values is most of an evaluation's cost, so the parts of the
        response that no expression of this watch mentions are left null.
        """
        uses = self._uses
        return {
            "response": celtypes.MapType(
                {
                    _CODE: celtypes.IntType(response.code),
                    _HEADERS: _cel(dict(response.headers)) if "headers" in uses else None,
                    _BODY: _cel(response.body) if "body" in uses else None,
                    _TEXT: celtypes.StringType(response.text) if "text" in uses else None,
                }
            )
        }

    def judge(self, response: Response) -> tuple[bool, bool]:
        """(failureWhen, successWhen) for a response; successWhen is not evaluated (False)
        when failureWhen holds. Raises `EvaluationError` like the evaluations would.

        A pending job answers the same thing poll after poll, so the verdict on the
        previous response is reused when this one is identical in everything the
        expressions can see (a digest stands for the body: it may be large).
        """
        key: tuple[object, ...]
        if self._fields == ():
            key = (response.code,)  # the conditions read nothing but the code
        elif self._fields is not None:
            # Only the fields the conditions read: a job's progress counter may change
            # at every poll while its status stays "RUNNING".
            body = response.body
            values = (
                tuple(_fingerprint(body.get(name, _MISSING)) for name in self._fields)
                if isinstance(body, dict)
                else ()
            )
            key = (response.code, type(body).__name__, values)
        else:
            key = (
                response.code,
                hashlib.blake2b(response.text.encode(), digest_size=16).digest(),
                tuple(sorted(response.headers.items())) if "headers" in self._uses else None,
            )
        if self._last is not None and self._last[0] == key:
            verdict = self._last[1]
        else:
            activation = self.activation(response)
            try:
                failed = self.is_failure(activation)
                verdict = (failed, not failed and self.is_success(activation))
            except EvaluationError as error:
                verdict = error
            self._last = (key, verdict)
        if isinstance(verdict, EvaluationError):
            # A fresh exception each time: re-raising one object grows its traceback.
            raise EvaluationError(verdict.field, verdict.detail)
        return verdict

    def is_failure(self, activation: Context) -> bool:
        return _boolean("spec.failureWhen", self._failure.evaluate("spec.failureWhen", activation))

    def is_success(self, activation: Context) -> bool:
        return _boolean("spec.successWhen", self._success.evaluate("spec.successWhen", activation))

    def results(self, activation: Context) -> dict[str, Any]:
        """Each `result` expression's value as plain JSON data; None where one fails."""
        values: dict[str, Any] = {}
        for name, program in self._results:
            try:
                values[name] = _to_json(program.evaluate(f"spec.result.{name}", activation))
            except EvaluationError:
                values[name] = None
        return values


def final_result(
    compiled: CompiledWatch, response: Response | None, max_bytes: int = 4096
) -> tuple[Any, str | None]:
    """`status.result` for the last response, and why it was left out if it was.

    With `spec.result` it is the results object, otherwise the JSON body.
    """
    if response is None:
        return None, None
    if compiled.has_results:
        value: Any = compiled.results(compiled.activation(response))
    else:
        value = response.body
    if value is None:
        return None, None
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        return None, f"result omitted: {size} bytes exceeds the {_size(max_bytes)} limit"
    return value, None


def _to_json(value: Any) -> Any:
    """A CEL value as JSON data: what `status.result` and the Kubernetes API can hold."""
    if value is None:
        return None
    if isinstance(value, bool | celtypes.BoolType):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # JSON has no NaN or infinity.
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()  # as Kubernetes writes bytes in JSON
    if isinstance(value, Mapping):
        return {_json_key(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    return str(value)  # timestamps, durations, types: their CEL text form


def _json_key(key: Any) -> str:
    """JSON object keys are strings; CEL map keys may also be ints, uints or bools."""
    return str(key) if isinstance(key, str) else json.dumps(_to_json(key))


def _boolean(field: str, value: celtypes.Value) -> bool:
    if isinstance(value, bool | celtypes.BoolType):
        return bool(value)
    raise EvaluationError(field, f"evaluated to {_cel_name(type(value).__name__)}, not a bool")


def _cel_name(class_name: str) -> str:
    """CEL's name for a celpy value class: `StringType` is `string`, `NoneType` is `null`."""
    name = class_name.removesuffix("Type").lower()
    return "null" if name == "none" else name


def _describe(error: CELEvalError) -> str:
    message = str(error.args[0]) if error.args else "evaluation failed"
    if message in _NEEDS_ARGUMENT and len(error.args) > 2 and isinstance(error.args[2], tuple):
        message = f"{message}: {error.args[2][0]}"
    message = _ACTIVATION_DUMP.sub("", message)
    message = _RULE_TOKEN.sub(r"\1", _CEL_CLASS.sub(lambda match: _cel_name(match[1]), message))
    message = _NO_FIELDS.sub(r"cannot select a field of a \1 value", message)
    return excerpt(message)


def excerpt(text: str, limit: int = EXCERPT_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters (ending in an ellipsis when cut)."""
    # Only a prefix is split: the text may be a 1 MiB response body.
    line = " ".join(text[: limit * 2].split())
    if len(line) <= limit and len(text) <= limit * 2:
        return line
    return line[: limit - 1] + "…"


def _size(limit: int) -> str:
    return f"{limit // 1024} KiB" if limit % 1024 == 0 else f"{limit} bytes"
