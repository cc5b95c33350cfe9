"""CEL for `successWhen`, `failureWhen` and `result`: compiled once, evaluated per response.

Each distinct expression text is compiled once (`Cel`, one per process, keeps the
programs in a bounded cache), so 10k watches sharing the default `successWhen` share one
program.

Two cel-python runners are used together. The compiled runner (CEL transpiled to
Python) is six to seven times faster in our measurements, but in cel-python 0.5.0 it gets
CEL's error-absorbing `&&`, `||`, `?:` and `has()` wrong whenever a field is selected on a
value that is not a map: `has(response.body.status) && response.body.status == "DONE"`
raises on a non-JSON body instead of giving false. So it only answers when it succeeds
(it never returned a different value in our comparisons); when it raises, the interpreted
runner, which implements CEL's semantics, gives the authoritative value or error. The
common path is fast, and an error costs one more evaluation.

The compiled runner is not thread-safe (it keeps its activation in module globals): it
runs only on the event loop's thread.

Expressions that iterate (`all`, `exists`, `map`, ...) over a response can take up to
about a second of CPU within the budget below, so they never run on the event loop: one
worker thread evaluates them with the interpreted runner (`prepare_verdict`,
`prepare_result`), and the event loop only picks up the verdict. The event loop then
waits for the GIL at most about one switch interval at a time (the operator sets 1 ms;
measured longest loop pause 6.3 ms), however long they take.

Expressions are written by namespace users, so their cost is bounded before they run:
a budget checked at compile time (as Kubernetes does for CRD validation rules) from the
worst-case sizes of what they read, comprehension nesting at most `MAX_NESTING`, a
response body of at most `MAX_BODY_VALUES` JSON values, and linear-time `duration()` and
`timestamp()` (cel-python's own backtrack: 22 characters took a second). `matches()`
is RE2 (linear) in cel-python already.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import celpy
import re2  # type: ignore[import-untyped]
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, Context
from lark import Token, Tree

from jobwatch.core.outcome import Response
from jobwatch.core.spec import WatchSpec

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


MAX_NESTING = 2  # comprehensions (all, exists, exists_one, map, filter) inside each other
MAX_COST = 200_000  # estimated worst-case operations; 64 characters or items count as one
MAX_BODY_VALUES = 10_000  # JSON values (scalars and containers) of a body expressions read
MAX_TIME_TEXT = 64  # characters of a duration() or timestamp() argument
MAX_PROGRAMS = 4096  # distinct expression texts whose programs are kept
# The worst case of what an expression reads from the response: the body cap (1 MiB), in
# characters of a string or items of a list or map; and of a comprehension's iterations,
# which the body's value limit bounds (every list or map in it has fewer items).
_DATA = 1 << 20
_ITERATIONS = MAX_BODY_VALUES
_PER_UNIT = 64
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


class _OverBudget(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Estimate:
    cost: int  # operations, plus one per `_PER_UNIT` characters or items handled
    size: int  # characters of a string, or items of a list or map (nested ones included)


class _EvaluationCost:
    """The cost budget of one evaluation: the worst-case cost of an expression, from the
    worst-case sizes of its inputs, against `MAX_COST`.

    A comprehension costs its body once per iteration; for the body's work that grows
    with the iteration variable, the items of a list together are no larger than the
    list, so that part counts once with the whole list's size (sizes add up, as does
    the work on them: copying, comparing, searching).
    """

    @classmethod
    def excess(cls, tree: Tree[Token]) -> str | None:
        """Which limit the expression exceeds, or None."""
        try:
            estimate = cls().estimate(tree, {}, 0)
        except _OverBudget as error:
            return str(error)
        if estimate.cost > MAX_COST:
            return (
                f"estimated cost {estimate.cost} exceeds the budget of {MAX_COST}"
                " (comprehensions over the response, and work on long strings or lists,"
                " count for their worst case)"
            )
        return None

    def estimate(self, node: Tree[Token] | Token, scope: dict[str, int], depth: int) -> _Estimate:
        if isinstance(node, Token):
            return _Estimate(0, 0)
        kind, children = node.data, node.children
        if kind == "literal":
            return _Estimate(1, len(str(children[0])))
        if kind == "ident":
            name = str(children[0])
            return _Estimate(1, scope.get(name, _DATA if name == "response" else 1))
        if kind == "member_dot_arg" and str(children[1]) in _MACROS:
            return self.comprehension(children, scope, depth)
        parts = [self.estimate(child, scope, depth) for child in children]
        cost = sum(part.cost for part in parts)
        size = max((part.size for part in parts), default=0)
        if kind in ("member_dot_arg", "ident_arg"):  # a function: linear in its inputs
            size = sum(part.size for part in parts)
            return _Estimate(cost + 1 + size // _PER_UNIT, size)
        if len(children) < 2 or kind in ("member_dot", "member_index", "exprlist", "expr"):
            return _Estimate(cost + len(children) - 1 if kind == "expr" else cost, size)
        first = children[0]
        if kind == "addition" and isinstance(first, Tree) and first.data == "addition_add":
            size = sum(part.size for part in parts)  # concatenation
            return _Estimate(cost + 1 + size // _PER_UNIT, size)
        if kind in ("list_lit", "map_lit", "mapinits", "fieldinits"):
            return _Estimate(cost + 1, sum(part.size for part in parts) + len(children))
        # Operators: comparing or searching is linear in the operands.
        return _Estimate(cost + 1 + sum(part.size for part in parts) // _PER_UNIT, 1)

    def comprehension(
        self, children: list[Tree[Token] | Token], scope: dict[str, int], depth: int
    ) -> _Estimate:
        if depth + 1 > MAX_NESTING:
            raise _OverBudget(
                f"comprehensions nested {depth + 1} deep; at most {MAX_NESTING} are allowed"
            )
        source = self.estimate(children[0], scope, depth)
        third = children[2] if len(children) > 2 else None
        arguments = third.children if isinstance(third, Tree) else []
        if len(arguments) < 2 or not isinstance(arguments[0], Tree):
            return source  # malformed: the evaluator reports it
        variable = next(arguments[0].scan_values(lambda token: isinstance(token, Token)))
        empty = [self.estimate(a, {**scope, str(variable): 1}, depth + 1) for a in arguments[1:]]
        whole = [
            self.estimate(a, {**scope, str(variable): source.size}, depth + 1)
            for a in arguments[1:]
        ]
        steps = min(source.size, _ITERATIONS)
        base = sum(part.cost for part in empty) + 1
        cost = (
            source.cost
            + steps * base
            + sum(w.cost - e.cost for w, e in zip(whole, empty, strict=True))
        )
        if str(children[1]) == "map":
            size = steps * empty[-1].size + whole[-1].size - empty[-1].size
        else:
            size = source.size if str(children[1]) == "filter" else 1
        return _Estimate(cost, size)


# A comprehension macro anywhere in the text (a string literal that looks like one only
# sends the expression to the thread for nothing).
_ITERATES = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(")


@dataclass(frozen=True, slots=True)
class _Program:
    text: str
    fast: celpy.Runner
    exact: celpy.Runner
    excess: str | None  # the budget limit the expression exceeds

    @property
    def iterates(self) -> bool:
        return _ITERATES.search(self.text) is not None

    def evaluate(
        self, field: str, activation: Context, *, off_loop: bool = False
    ) -> celtypes.Value:
        """`off_loop`: called from the evaluator thread, where only the interpreted runner
        may run."""
        if not off_loop:
            try:
                return self.fast.evaluate(activation)
            except Exception:  # the interpreter decides what any failure means
                pass
        try:
            return self.exact.evaluate(activation)
        except CELEvalError as error:
            raise EvaluationError(field, _describe(error)) from None
        except Exception as error:  # any crash of the evaluator is this response's problem
            raise EvaluationError(field, excerpt(f"{type(error).__name__}: {error}")) from None


# A duration in CEL's form; RE2 matches it in linear time, which cel-python's own
# parser does not (it backtracks exponentially on "aaaa…!").
_DURATION = re2.compile(r"-?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:h|m|s|ms|us|µs|ns))+|0")


def _time_text(kind: str, value: celtypes.Value) -> celtypes.Value | CELEvalError:
    if isinstance(value, str) and len(value) > MAX_TIME_TEXT:
        return CELEvalError(f"{kind}() takes at most {MAX_TIME_TEXT} characters")
    return value


def _duration(value: celtypes.Value) -> celtypes.Value | CELEvalError:
    checked = _time_text("duration", value)
    if isinstance(checked, str) and not _DURATION.fullmatch(checked):
        return CELEvalError(f"duration() cannot parse {checked!r}")
    return checked if isinstance(checked, CELEvalError) else celtypes.DurationType(checked)


def _timestamp(value: celtypes.Value) -> celtypes.Value | CELEvalError:
    checked = _time_text("timestamp", value)
    if isinstance(checked, str):
        return celtypes.TimestampType(checked)
    return (
        checked if isinstance(checked, CELEvalError) else CELEvalError("timestamp() takes a string")
    )


_LINEAR_FUNCTIONS: dict[str, Any] = {"duration": _duration, "timestamp": _timestamp}
_NOT_RUN: Any = None  # the runners of a program over budget, which never runs


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


def _headers(headers: Mapping[str, str]) -> celtypes.MapType:
    return celtypes.MapType(
        {celtypes.StringType(k): celtypes.StringType(v) for k, v in headers.items()}
    )


class _TooLarge(Exception):
    pass


def _body(body: Any) -> celtypes.Value | CELEvalError:
    """The body as CEL values, or the error any expression reading it gets: one over
    `MAX_BODY_VALUES` values (converting and iterating it would be unbounded work)."""
    left = [MAX_BODY_VALUES]
    try:
        return _cel(body, left)
    except _TooLarge:
        return CELEvalError(f"response.body has more than {MAX_BODY_VALUES} JSON values")
    except RecursionError:
        return CELEvalError("response.body is nested too deeply")


def _cel(value: Any, left: list[int]) -> celtypes.Value:
    """Parsed JSON as CEL values: `celpy.json_to_cel`, without its costly isinstance
    checks against typing generics (exact JSON types only, which is all json gives).
    `left` counts down the values still allowed."""
    left[0] -= 1
    if left[0] < 0:
        raise _TooLarge
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
        return celtypes.MapType({celtypes.StringType(k): _cel(v, left) for k, v in value.items()})
    if kind is list:
        return celtypes.ListType([_cel(item, left) for item in value])
    if value is None:
        return None
    return json_to_cel(value)


class Cel:
    """The CEL of one operator process: the two runners' environments, each distinct
    expression text's program (compiled once, in a bounded cache, so 10k watches sharing
    the default `successWhen` share one program), and the one thread that evaluates
    iterating expressions (one at a time, in arrival order, never two for one watch: a
    watch has one poll at a time). Made by the start-up factory.

    cel-python builds one process-wide parser with the tree class of the first
    Environment; the compiled runner needs its own tree class (which the interpreter
    accepts too), so the first `Cel` must be made before any other cel-python
    Environment of the process.
    """

    def __init__(self, max_programs: int = MAX_PROGRAMS) -> None:
        self._compiled = celpy.Environment(runner_class=celpy.CompiledRunner)
        self._interpreted = celpy.Environment(runner_class=celpy.InterpretedRunner)
        self._program = functools.lru_cache(maxsize=max_programs)(self._new_program)
        self._condition = functools.lru_cache(maxsize=max_programs)(self._new_condition)
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobwatch-cel")

    def compile(self, spec: WatchSpec) -> CompiledWatch:
        """Raises `ExpressionError` naming the field of an expression that does not compile
        (or, for the conditions, evidently does not evaluate to a bool)."""
        return CompiledWatch(
            self._condition("spec.successWhen", spec.success_when),
            self._condition("spec.failureWhen", spec.failure_when),
            tuple((name, self._checked(f"spec.result.{name}", text)) for name, text in spec.result),
            _mentioned(spec),
            self._evaluator,
        )

    def _new_program(self, text: str) -> _Program:
        ast = self._compiled.compile(text)
        excess = _EvaluationCost.excess(ast)
        if excess is not None:
            return _Program(text, _NOT_RUN, _NOT_RUN, excess)
        fast = self._compiled.program(ast, functions=_LINEAR_FUNCTIONS)
        exact = self._interpreted.program(ast, functions=_LINEAR_FUNCTIONS)
        return _Program(text, fast, exact, None)

    def _checked(self, field: str, text: str) -> _Program:
        try:
            program = self._program(text)
        except CELParseError as error:
            where = f" at line {error.line}, column {error.column}" if error.line else ""
            raise ExpressionError(f"{field}: syntax error{where}: {excerpt(text)}") from None
        except (RecursionError, SyntaxError):
            # The parser and the transpiled Python both recurse once per nesting level.
            raise ExpressionError(f"{field}: nested too deeply to compile") from None
        if program.excess is not None:
            raise ExpressionError(f"{field}: {program.excess}")
        return program

    def _new_condition(self, field: str, text: str) -> _Program:
        program = self._checked(field, text)
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


class CompiledWatch:
    """The compiled expressions of one `WatchSpec`."""

    __slots__ = (
        "_evaluator",
        "_failure",
        "_fields",
        "_iterates",
        "_last",
        "_prepared",
        "_result_fields",
        "_results",
        "_success",
        "_uses",
    )

    def __init__(
        self,
        success: _Program,
        failure: _Program,
        results: tuple[tuple[str, _Program], ...],
        uses: frozenset[str],
        evaluator: Executor,
    ) -> None:
        self._evaluator = evaluator  # the thread that evaluates iterating expressions
        self._success = success
        self._failure = failure
        self._results = results
        self._uses = uses
        self._last: tuple[tuple[object, ...], tuple[bool, bool] | EvaluationError] | None = None
        self._fields = _body_fields([success.text, failure.text])
        self._result_fields = _body_fields([program.text for _, program in results])
        self._iterates = success.iterates or failure.iterates
        self._prepared: tuple[Response, dict[str, Any]] | None = None

    @property
    def has_results(self) -> bool:
        return bool(self._results)

    def activation(self, response: Response, fields: tuple[str, ...] | None = None) -> Context:
        """The CEL variables for one response; build once, use for every expression.

        Converting to CEL values is most of an evaluation's cost, so the parts of the
        response that no expression of this watch mentions are left null. With `fields`
        (all that the expressions to evaluate read of the body: `_body_fields`), only
        those top-level fields of a JSON object body are converted: a large body whose
        `status` is all the conditions read costs no more than a small one, and stays
        within `MAX_BODY_VALUES`.
        """
        uses = self._uses
        body = response.body
        if fields is not None and isinstance(body, dict):
            body = {name: body[name] for name in fields if name in body}
        return {
            "response": celtypes.MapType(
                {
                    _CODE: celtypes.IntType(response.code),
                    _HEADERS: _headers(response.headers) if "headers" in uses else None,
                    _BODY: _body(body) if "body" in uses else None,
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
        key = self._key(response)
        if self._last is not None and self._last[0] == key:
            verdict = self._last[1]
        else:
            verdict = self._verdict(key, response, off_loop=False)
        if isinstance(verdict, EvaluationError):
            # A fresh exception each time: re-raising one object grows its traceback.
            raise EvaluationError(verdict.field, verdict.detail)
        return verdict

    async def prepare_verdict(self, response: Response) -> None:
        """Evaluates conditions that iterate on the evaluator thread, so that `judge` then
        only reuses the verdict. Does nothing for the others (most of them)."""
        if not self._iterates:
            return
        key = self._key(response)
        if self._last is None or self._last[0] != key:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._evaluator, self._verdict, key, response, True)

    def _key(self, response: Response) -> tuple[object, ...]:
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
        return key

    def _verdict(
        self, key: tuple[object, ...], response: Response, off_loop: bool
    ) -> tuple[bool, bool] | EvaluationError:
        activation = self.activation(response, self._fields)
        verdict: tuple[bool, bool] | EvaluationError
        try:
            failed = self.is_failure(activation, off_loop=off_loop)
            verdict = (failed, not failed and self.is_success(activation, off_loop=off_loop))
        except EvaluationError as error:
            verdict = error
        self._last = (key, verdict)
        return verdict

    def is_failure(self, activation: Context, *, off_loop: bool = False) -> bool:
        field = "spec.failureWhen"
        return _boolean(field, self._failure.evaluate(field, activation, off_loop=off_loop))

    def is_success(self, activation: Context, *, off_loop: bool = False) -> bool:
        field = "spec.successWhen"
        return _boolean(field, self._success.evaluate(field, activation, off_loop=off_loop))

    def results(self, activation: Context, *, off_loop: bool = False) -> dict[str, Any]:
        """Each `result` expression's value as plain JSON data; None where one fails."""
        values: dict[str, Any] = {}
        for name, program in self._results:
            field = f"spec.result.{name}"
            try:
                values[name] = _to_json(program.evaluate(field, activation, off_loop=off_loop))
            except EvaluationError:
                values[name] = None
        return values

    async def prepare_result(self, response: Response) -> None:
        """Evaluates `result` expressions that iterate on the evaluator thread, for the
        `final_result` of this same response to pick up."""
        if not any(program.iterates for _, program in self._results):
            return
        loop = asyncio.get_running_loop()
        activation = await loop.run_in_executor(self._evaluator, self._results_off_loop, response)
        self._prepared = (response, activation)

    def _results_off_loop(self, response: Response) -> dict[str, Any]:
        return self.results(self.activation(response, self._result_fields), off_loop=True)

    def prepared_results(self, response: Response) -> dict[str, Any]:
        prepared = self._prepared
        if prepared is not None and prepared[0] is response:
            self._prepared = None
            return prepared[1]
        return self.results(self.activation(response, self._result_fields))


def final_result(
    compiled: CompiledWatch, response: Response | None, max_bytes: int = 4096
) -> tuple[Any, str | None]:
    """`status.result` for the last response, and why it was left out if it was.

    With `spec.result` it is the results object, otherwise the JSON body.
    """
    if response is None:
        return None, None
    if compiled.has_results:
        value: Any = compiled.prepared_results(response)
    else:
        value = response.body
    if value is None:
        return None, None
    try:
        # allow_nan=False: the status must stay writable whatever the body held.
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None, "result omitted: not representable as JSON"
    size = len(text.encode())
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
