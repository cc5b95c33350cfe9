"""Runs a Python module under a small statistical CPU profiler (standard library only).

    .venv/bin/python bench/sampling_profiler.py --out _out/bench/profile -m jobwatch

Every --interval seconds of CPU time the process consumes (ITIMER_PROF), SIGPROF
interrupts it and the handler records the main thread's Python stack. Samples are
therefore proportional to CPU time, and an idle event loop costs none. At exit it
writes OUT.txt (functions by self and inclusive share of the samples) and OUT.folded
(collapsed stacks, for any flame graph tool).

To profile a part of the run only (bench/scale.py --profile: its steady window),
SIGUSR1 drops what was sampled so far and SIGUSR2 writes the report and stops
sampling; the report at exit is then not written again.

Why not cProfile: it slows every Python call of the operator under test by a large
factor and distorts what it measures. Why not a sampling thread: it only gets the GIL
when the main thread releases it, so its samples pile up at I/O calls. Here a sample
is taken at the next bytecode boundary after the timer fires, so time spent in C code
(JSON parsing, TLS, uvloop) is charged to the Python code that called into it.
"""

from __future__ import annotations

import argparse
import collections
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType

Frame = tuple[str, int, str]  # file, first line, function


class Sampler:
    def __init__(self, interval: float, out: Path) -> None:
        self.interval, self.out = interval, out
        self.stacks: collections.Counter[tuple[Frame, ...]] = collections.Counter()
        self.reported = False

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        stack: list[Frame] = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_filename, code.co_firstlineno, code.co_name))
            frame = frame.f_back
        self.stacks[tuple(reversed(stack))] += 1

    def _reset(self, signum: int, frame: FrameType | None) -> None:
        self.stacks.clear()

    def _report_now(self, signum: int, frame: FrameType | None) -> None:
        self.stop()
        self.report()

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.signal(signal.SIGUSR1, self._reset)
        signal.signal(signal.SIGUSR2, self._report_now)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_IGN)

    def report(self, top: int = 45) -> None:
        if self.reported:
            return
        self.reported = True
        out = self.out
        total = sum(self.stacks.values()) or 1
        own: collections.Counter[Frame] = collections.Counter()
        inclusive: collections.Counter[Frame] = collections.Counter()
        for stack, count in self.stacks.items():
            own[stack[-1]] += count
            for frame in set(stack):
                inclusive[frame] += count
        lines = [
            f"{total} samples, one per {self.interval * 1000:g} ms of CPU time "
            f"({total * self.interval:.1f} s of CPU)",
            "",
            "self %   function (CPU in C code is charged to its Python caller)",
        ]
        lines += [f"{100 * c / total:6.2f}   {_name(f)}" for f, c in own.most_common(top)]
        lines += ["", "incl %   function"]
        lines += [f"{100 * c / total:6.2f}   {_name(f)}" for f, c in inclusive.most_common(top)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        with out.with_suffix(".folded").open("w") as folded:
            for stack, count in self.stacks.most_common():
                folded.write(";".join(_name(f) for f in stack) + f" {count}\n")


def _name(frame: Frame) -> str:
    path, line, function = frame
    parts = Path(path).parts
    # Short but findable: .../site-packages/kopf/x.py -> kopf/x.py, .../jobwatch/x.py kept.
    if "site-packages" in parts:
        parts = parts[len(parts) - parts[::-1].index("site-packages") :]
    elif "jobwatch" in parts:
        parts = parts[len(parts) - 1 - parts[::-1].index("jobwatch") :]
    elif len(parts) > 2:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{line}:{function}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.txt and OUT.folded")
    parser.add_argument("--interval", type=float, default=0.005, help="CPU seconds per sample")
    parser.add_argument("-m", dest="module", required=True, help="the module to run")
    args, rest = parser.parse_known_args()
    sampler = Sampler(args.interval, args.out)
    sys.argv = [args.module, *rest]
    sampler.start()
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    finally:
        sampler.stop()
        sampler.report()


if __name__ == "__main__":
    main()
