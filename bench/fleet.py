"""The fleet of JobWatches a bench harness creates, the harness's own watch on it, the
client of the job API's /stats, and the load plan a fleet asks of the operator.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import jobapi
from benchenv import GROUP, JW_PATH, VERSION, BenchError, go_duration
from kubeclient import Kube, KubeError

# The operator's defaults, for the figures that depend on them (app/config.py).
DEFAULT_MAX_IN_FLIGHT = 200
DEFAULT_REQUEST_TIMEOUT = 30.0  # spec.requestTimeout
# The operator spreads the first round of polls at up to this rate, or over one interval
# when that is faster (control.watchbook.START_UP_POLLS_PER_SECOND).
START_UP_POLLS_PER_S = 1000.0


@dataclass(frozen=True)
class Options:
    """A run's shape: bench/scale.py's command line; soak.py and replicas.py make one too,
    for the functions here and in controlplane.py that take it."""

    mode: str  # "scale", "overload" or "smoke"
    sizes: tuple[int, ...]
    interval: float  # seconds, spec.interval of every JobWatch (halved by --overload)
    duration: float  # the steady window, seconds
    kubeconfig: Path | None
    results_dir: Path
    seed: int
    mean_polls: float
    pending_fraction: float
    create_concurrency: int
    http_seconds: float
    sample_every: float  # seconds between series points
    profile: bool  # run the operator under bench/sampling_profiler.py
    operator_env: dict[str, str] = field(default_factory=dict)
    hosts: int = 1  # job API ports, each a host of its own to the operator
    latency: str = "none"  # the job API's answer delays (bench/jobapi.py --latency)
    request_timeout: float | None = None  # spec.requestTimeout; None: the default


def jobwatch(
    i: int, ports: Sequence[int], interval: float, request_timeout: float | None
) -> dict[str, Any]:
    """Watch i polls job j<i> on port i mod K. Only interval and timeout (and
    requestTimeout when given) differ from the defaults."""
    spec: dict[str, Any] = {
        "url": f"http://127.0.0.1:{ports[i % len(ports)]}/api/jobs/j{i}/status",
        "interval": go_duration(interval),
        "timeout": "1h",
        "successWhen": 'response.body.status == "COMPLETED"',
        "failureWhen": 'response.body.status == "FAILED"',
        "result": {"link": "response.body.resultLink"},
    }
    if request_timeout is not None:
        spec["requestTimeout"] = go_duration(request_timeout)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "JobWatch",
        "metadata": {"name": f"w{i:05d}"},
        "spec": spec,
    }


async def create_watches(
    kube: Kube, n: int, ports: Sequence[int], interval: float, opts: Options
) -> float:
    """Creates w00000 … with --create-concurrency requests in flight; the seconds it took."""
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:  # one iterator shared by all workers
            body = jobwatch(i, ports, interval, opts.request_timeout)
            for attempt in range(6):
                try:
                    await kube.request("POST", JW_PATH, body=body, ok=(201,))
                    break
                except KubeError as exc:
                    if exc.status not in (429, 500, 503, 504) or attempt == 5:
                        raise BenchError(f"creating {body['metadata']['name']}: {exc}") from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if attempt == 5:
                        raise BenchError(f"creating {body['metadata']['name']}: {exc!r}") from None
                await asyncio.sleep(0.2 * 2**attempt)

    started = time.monotonic()
    async with asyncio.timeout(max(120.0, n / 10)):
        await asyncio.gather(*(worker() for _ in range(opts.create_concurrency)))
    return time.monotonic() - started


class FleetWatch:
    """The harness's own watch on every JobWatch (admin token): when each was first seen
    with a status and Succeeded, and how many status writes (MODIFIED events) each
    received."""

    def __init__(self, kube: Kube, n: int) -> None:
        self._kube, self.n = kube, n
        self.modified = [0] * n
        self.phase: list[str | None] = [None] * n
        self.succeeded_at: list[float | None] = [None] * n
        self.status_at: list[float | None] = [None] * n  # first seen with a status.phase
        self.relists = 0  # a relist after a broken watch may have missed events
        self.ready = asyncio.Event()

    def _index(self, obj: dict[str, Any]) -> int | None:
        name = str(obj.get("metadata", {}).get("name", ""))
        if name[:1] == "w" and name[1:].isdigit() and int(name[1:]) < self.n:
            return int(name[1:])
        return None

    def _apply(self, kind: str, obj: dict[str, Any], now: float) -> None:
        i = self._index(obj)
        if i is None:
            return
        if kind == "MODIFIED":
            self.modified[i] += 1
        phase = (obj.get("status") or {}).get("phase")
        self.phase[i] = phase
        if phase is not None and self.status_at[i] is None:
            self.status_at[i] = now
        if phase == "Succeeded" and self.succeeded_at[i] is None:
            self.succeeded_at[i] = now

    async def _relist(self) -> str:
        items, version = await self._kube.list_all(JW_PATH)
        now = time.time()
        for obj in items:
            self._apply("LISTED", obj, now)
        return version

    async def run(self) -> None:
        version = await self._relist()
        self.ready.set()
        for _ in range(1000):  # reconnects, bounded
            try:
                async for event in self._kube.watch(JW_PATH, version):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                    version = str(obj.get("metadata", {}).get("resourceVersion", version))
                    if event.get("type") != "BOOKMARK":
                        self._apply(str(event.get("type")), obj, time.time())
            except (KubeError, aiohttp.ClientError) as exc:
                if isinstance(exc, KubeError) and exc.status == 410:
                    self.relists += 1
                    version = await self._relist()
                else:
                    await asyncio.sleep(1)

    def phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for phase in self.phase:
            key = phase or "(no status)"
            counts[key] = counts.get(key, 0) + 1
        return counts


class JobApi:
    def __init__(self, session: aiohttp.ClientSession, ports: Sequence[int]) -> None:
        self._session, self.ports = session, list(ports)
        self.base = f"http://127.0.0.1:{ports[0]}"

    async def _get(self, path: str) -> Any:
        async with self._session.get(
            self.base + path, timeout=aiohttp.ClientTimeout(total=30)
        ) as response:
            response.raise_for_status()
            return await response.json()

    async def stats(self) -> dict[str, float]:
        return dict(await self._get("/stats"))

    async def per_job(self) -> dict[str, list[Any]]:
        return dict(await self._get("/stats/jobs"))

    async def request_times(self, since: float | None = None) -> dict[str, list[float]]:
        """Every request per job; with `since`, those from then on and the last before."""
        query = "" if since is None else f"?since={since:.6f}"
        return dict(await self._get("/stats/requests" + query))

    async def request_delays(self) -> dict[str, list[float]]:
        return dict(await self._get("/stats/delays"))

    async def request_spans(
        self, since: float | None = None
    ) -> dict[str, list[tuple[float, float | None]]]:
        """Every request's [arrival, end]; with `since`, those in flight from then on."""
        query = "" if since is None else f"?since={since:.6f}"
        return dict(await self._get("/stats/spans" + query))

    async def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        for _ in range(200):  # 20 s
            if proc.poll() is not None:
                raise BenchError(f"the job API exited with {proc.returncode}")
            try:
                await self.stats()
                return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.1)
        raise BenchError("the job API did not answer within 20s")


def load_plan(opts: Options, n: int, interval: float) -> dict[str, Any]:
    """What the run asks of the operator's concurrency, per host and in all.

    In flight by Little's law: polls/s x how long each holds a slot, which is the mean
    answer time, or the request timeout for a request never answered. The operator runs
    with its defaults, per-host limits included (a user's first run has no others), plus
    --operator-env.
    """
    rate = n / interval
    per_host = rate / opts.hosts
    first_round_per_host = max(rate, START_UP_POLLS_PER_S) / opts.hosts
    latency = jobapi.parse_latency(opts.latency)
    timeout = opts.request_timeout or DEFAULT_REQUEST_TIMEOUT
    held = None if latency is None else (1 - latency.hang) * latency.mean + latency.hang * timeout
    plan: dict[str, Any] = {
        "polls_per_s": round(rate, 1),
        "hosts": opts.hosts,
        "polls_per_s_per_host": round(per_host, 1),
        "first_round_polls_per_s_per_host": round(first_round_per_host, 1),
        "latency": None if latency is None else latency.spec(),
        "request_timeout_s": timeout,
        "mean_slot_s": None if held is None else round(held, 4),
        # docs/operations.md's rule of thumb: poll rate x typical (median) latency.
        "in_flight_median_rule": None if latency is None else math.ceil(rate * latency.median),
        "in_flight_littles_law": None if held is None else math.ceil(rate * held),
    }
    max_in_flight = int(
        opts.operator_env.get(
            "JOBWATCH_MAX_IN_FLIGHT",
            os.environ.get("JOBWATCH_MAX_IN_FLIGHT", str(DEFAULT_MAX_IN_FLIGHT)),
        )
    )
    plan["operator_env"] = dict(opts.operator_env)
    plan["max_in_flight"] = max_in_flight
    return plan
