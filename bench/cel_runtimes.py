"""Compare CEL runtimes for jobwatch: time per evaluation, attack cases, corner semantics.

Run: .venv/bin/python bench/cel_runtimes.py
(prints figures, writes _out/bench/results/cel-runtimes-*.json)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cel
import cel_expr_python.cel as gcel

from jobwatch.core.expressions import Cel
from jobwatch.core.outcome import Response
from jobwatch.core.spec import parse_spec

SMALL = {"status": "COMPLETED", "n": 3}
EXPRESSIONS = ['response.body.status == "COMPLETED"', "response.code >= 200 && response.code < 300"]
ATTACKS = {
    "duration 20 chars": 'duration("' + "a" * 19 + '!")',
    "matches (a+)+$": '"' + "a" * 30 + '!".matches("(a+)+$")',
    "nested all 3 deep x 20": "L.all(a, L.all(b, L.all(c, true)))",
    "map doubling x 16": "[response.text]" + ".map(x, x + x)" * 16 + ".size()",
    "exists over 200k-item body": "response.body.items.exists(x, x == -1)",
}
CORNERS = [
    ("missing field", 'response.body.state == "X"', SMALL),
    ("has() on null body", 'has(response.body.status) && response.body.status == "D"', None),
    ("error absorbed by &&", 'response.body.status == "D" && response.code == 500', None),
    ("int == string", 'response.code == "200"', SMALL),
    ("int > double", "response.code > 1.5", SMALL),
    ("json int > double", "response.body.n > 1.5", SMALL),
    ("header", 'response.headers["content-type"] == "application/json"', SMALL),
    ("macro", "[1, 2].all(x, x > 0) && {'a': 1}.exists(k, k == 'a')", SMALL),
    ("conversions", 'string(response.code) == "200" && int("7") == 7', SMALL),
    (
        "time",
        'duration("90s") < duration("2m") && timestamp("2026-01-01T00:00:00Z") != null',
        SMALL,
    ),
]


def response(body: Any, text: str | None = None) -> dict[str, Any]:
    raw = json.dumps(body) if text is None else text
    return {"code": 200, "headers": {"content-type": "application/json"}, "body": body, "text": raw}


def per_call(function: Callable[[], Any], budget: float = 0.3) -> float:
    """Microseconds per call, or -1 for a call that raised; stops after `budget` s."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget:
        function()
        count += 1
    return (time.perf_counter() - started) / count * 1e6


def outcome(function: Callable[[], Any]) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        result = repr(function())[:60]
    except Exception as error:
        result = f"error: {type(error).__name__}: {str(error)[:60]}"
    return result, (time.perf_counter() - started) * 1000


class Celpython:
    name = "cel-python 0.5.0 (jobwatch: compiled runner + interpreter)"

    def runner(self, text: str, resp: dict[str, Any]) -> Callable[[], Any]:
        watch = Cel().compile(parse_spec({"url": "http://x/", "successWhen": text}))
        r = Response(200, resp["headers"], resp["text"], 1, _json=resp["body"])
        return lambda: watch.is_success(watch.activation(r))

    def raw(self, text: str, resp: dict[str, Any]) -> Callable[[], Any]:
        import celpy  # noqa: PLC0415 - only this runtime needs it

        env = celpy.Environment()
        program = env.program(env.compile(text))
        activation = {"response": celpy.json_to_cel(resp), "L": celpy.json_to_cel(list(range(20)))}
        return lambda: program.evaluate(activation)


class Rust:
    name = "common-expression-language 0.10.0 (Rust cel crate)"

    def runner(self, text: str, resp: dict[str, Any]) -> Callable[[], Any]:
        program = cel.compile(text)
        return lambda: program.execute({"response": resp})

    raw = runner

    def raw_attack(self, text: str, resp: dict[str, Any]) -> Callable[[], Any]:
        program = cel.compile(text)
        return lambda: program.execute({"response": resp, "L": list(range(20))})


class Google:
    name = "cel-expr-python 0.1.3 (Google cel-cpp)"

    def __init__(self) -> None:
        dyn = gcel.Type.DYN
        self.env = gcel.NewEnv(
            variables={"response": gcel.Type.Map(gcel.Type.STRING, dyn), "L": dyn}
        )

    def runner(self, text: str, resp: dict[str, Any]) -> Callable[[], Any]:
        expression = self.env.compile(text)
        return lambda: expression.eval(
            self.env.Activation({"response": resp, "L": list(range(20))})
        ).value()

    raw = runner


def main() -> None:
    results: dict[str, Any] = {"when": datetime.now(UTC).isoformat(), "runtimes": {}}
    big = response({"items": list(range(200_000))})
    for runtime in (Celpython(), Rust(), Google()):
        figures: dict[str, Any] = {"per_eval_us": {}, "attacks": {}, "corners": {}}
        print(f"\n== {runtime.name}")
        for text in EXPRESSIONS:
            us = per_call(runtime.runner(text, response(SMALL)))
            figures["per_eval_us"][text] = round(us, 2)
            print(f"  {us:8.2f} us  {text}")
        attack_runner = getattr(runtime, "raw_attack", runtime.raw)
        for label, text in ATTACKS.items():
            resp = big if "200k" in label else response(SMALL, text="ab")
            try:
                run = attack_runner(text, resp)
                result, ms = outcome(run)
            except Exception as error:
                result, ms = f"compile error: {str(error)[:60]}", 0.0
            figures["attacks"][label] = {"ms": round(ms, 2), "result": result}
            print(f"  {ms:8.1f} ms  {label}: {result}")
        for label, text, body in CORNERS:
            resp = response(body, text=None if body is not None else "<html>")
            result, _ = outcome(runtime.raw(text, resp))
            figures["corners"][label] = result
            print(f"  {label}: {result}")
        results["runtimes"][runtime.name] = figures
    # git-ignored; see docs/benchmarks.md, "Keeping a result"
    out = Path(__file__).parents[1] / "_out" / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    out /= f"cel-runtimes-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
