"""Child processes of a bench harness: started in sessions of their own, always stopped.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchenv import REPO, BenchError


class Children:
    """Every long-running process the harness starts; all are stopped, whatever happens.

    Each gets a session of its own, so that Ctrl-C reaches only the harness, which
    then stops them in order (the operator first, with SIGTERM, so it can flush).
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    async def stop(self, proc: subprocess.Popen[bytes], grace: float) -> tuple[float, bool]:
        """SIGTERM, then SIGKILL after `grace` seconds; (seconds it took, whether killed)."""
        started = time.monotonic()
        killed = False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await asyncio.to_thread(proc.wait)
            except TimeoutError:
                proc.kill()
                killed = True
                await asyncio.to_thread(proc.wait)
        if proc in self._procs:
            self._procs.remove(proc)
        return time.monotonic() - started, killed

    def stop_all(self) -> None:
        """The safety net (synchronous: it also runs after the event loop is gone)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


async def run_command(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> str:
    """Runs a command to its end (callers bound it with asyncio.timeout); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except BaseException:  # cancelled or timed out: leave no process behind
        if proc.returncode is None:
            proc.kill()
        raise
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{out.decode()}\n{err.decode()}"
        )
    return out.decode()


async def sleep_checking(seconds: float, check: Callable[[], None]) -> None:
    """Sleeps `seconds`, calling `check` (it raises when a child process died) every second
    and at the end: a harness fails early rather than after its whole wait."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check()
        await asyncio.sleep(min(1.0, left))
    check()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
