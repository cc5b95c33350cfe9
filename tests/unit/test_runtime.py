"""When polling starts: the first round after start-up is spread, not one burst; an
end another replica wrote is taken in, not written over.

Its parts have their own tests: test_intake.py, test_poller.py (and test_isolation.py),
test_handover.py, test_hostwaits.py, test_requestparts.py; what users see of them is
tested end to end (tests/e2e).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from jobwatch.app.config import Config
from jobwatch.control.runtime import Runtime
from jobwatch.control.watchbook import START_UP_POLLS_PER_SECOND
from jobwatch.core.patch import Fence
from jobwatch.core.refs import ObjectRef
from jobwatch.core.spec import spec_hash
from jobwatch.core.watch import format_time
from jobwatch.jobservice.client import HttpClient
from jobwatch.jobservice.egress import EgressPolicy
from jobwatch.kits.metrics import Metrics
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import PATCH_NOT_APPLIED, ApiError

NOW = 1_800_000_000.0
SPEC = {"url": "http://127.0.0.1:1/status", "interval": "5s"}


def jobwatch(n: int, spec: dict[str, Any] = SPEC, status: dict[str, Any] | None = None) -> Any:
    meta = {"namespace": "ns", "name": f"w{n}", "uid": f"u{n}", "generation": 1}
    return {"metadata": meta, "spec": spec, **({"status": status} if status else {})}


MakeRuntime = Callable[[], Runtime]


@pytest.fixture
async def make_runtime() -> AsyncIterator[MakeRuntime]:
    made: list[Runtime] = []
    http = HttpClient(EgressPolicy())

    def make() -> Runtime:
        # Nothing here reaches the API server: polls are planned, never sent.
        api = KubeApi.__new__(KubeApi)
        runtime = Runtime(
            Config.from_env({}),
            api,
            http,
            Metrics(),
            wall=lambda: NOW,
            rand=random.Random(7).random,
        )
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.scheduler.stop()
    await http.aclose()


def planned(runtime: Runtime) -> list[float]:
    return sorted(w.next_poll_time - NOW for w in runtime.watches.values() if w.next_poll_time)


async def test_a_large_first_round_is_spread_at_the_start_up_rate(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime()
    for n in range(3000):
        runtime.observe("ADDED", jobwatch(n))
    assert planned(runtime) == [0.0] * 3000  # all due at once
    runtime.start_polling()
    await runtime.scheduler.stop()
    spread = planned(runtime)
    window = 3000 / START_UP_POLLS_PER_SECOND  # 3 s, inside the 5 s interval
    assert spread[0] >= 0 and spread[-1] <= window
    assert spread[-1] > 0.9 * window
    # Evenly: about a tenth of the polls in each tenth of the window.
    per_tenth = [
        sum(1 for t in spread if k * window / 10 <= t < (k + 1) * window / 10) for k in range(10)
    ]
    assert min(per_tenth) > 200


async def test_each_watch_polls_within_its_own_interval(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    for n in range(3000):
        runtime.observe("ADDED", jobwatch(n, {**SPEC, "interval": "1s"}))
    runtime.start_polling()
    assert planned(runtime)[-1] <= 1.0


async def test_a_few_watches_poll_at_once(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    for n in range(10):
        runtime.observe("ADDED", jobwatch(n))
    runtime.start_polling()
    assert planned(runtime)[-1] <= 10 / START_UP_POLLS_PER_SECOND  # 10 ms


async def test_a_resumed_watch_keeps_its_planned_poll(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    status = {
        "phase": "Polling",
        "specHash": spec_hash(SPEC),
        "startTime": format_time(NOW - 60),
        "deadline": format_time(NOW + 540),
        "nextPollTime": format_time(NOW + 3.5),
        "attempts": 12,
    }
    runtime.observe("ADDED", jobwatch(0, status=status))
    for n in range(1, 3000):
        runtime.observe("ADDED", jobwatch(n))
    runtime.start_polling()
    assert runtime.watches[("ns", "w0")].next_poll_time == pytest.approx(NOW + 3.5, abs=0.001)


class EndedElsewhere:
    """The API server once another replica has ended the JobWatch: a fenced write is
    refused as kube-apiserver refuses it, and a read shows the end."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body, self.patches, self.gets = body, 0, 0

    async def patch_status(self, ref: ObjectRef, status: Any, fence: Fence | None = None) -> None:
        self.patches += 1
        raise ApiError(422, PATCH_NOT_APPLIED)

    async def get_jobwatch(self, ref: ObjectRef) -> dict[str, Any]:
        self.gets += 1
        return self.body

    async def create_event(self, ref: ObjectRef, **_: Any) -> None:
        pass


async def test_an_end_another_replica_wrote_is_taken_in_and_nothing_more_is_written() -> None:
    end = {
        "phase": "Succeeded",
        "reason": "SuccessConditionMet",
        "specHash": spec_hash(SPEC),
        "startTime": format_time(NOW - 60),
        "deadline": format_time(NOW + 540),
        "completionTime": format_time(NOW - 1),
        "observedGeneration": 1,
        "holder": "replica-b",
    }
    api = EndedElsewhere(jobwatch(0, status=end))
    http = HttpClient(EgressPolicy())
    runtime = Runtime(Config.from_env({}), api, http, Metrics(), wall=lambda: NOW)  # type: ignore[arg-type]
    runtime.observe("ADDED", jobwatch(0))  # as listed before the other replica ended it
    runtime.start()
    try:
        async with asyncio.timeout(5):
            while not runtime.watches[("ns", "w0")].finished:
                await asyncio.sleep(0.005)
        watch = runtime.watches[("ns", "w0")]
        assert (watch.phase.value, watch.reason) == ("Succeeded", "SuccessConditionMet")
        assert not runtime.scheduler.planned(("ns", "w0"))
        assert runtime.writer.pending == 0
        assert (api.patches, api.gets) == (1, 1)
    finally:
        await runtime.shutdown(1.0)
        await http.aclose()
    assert api.patches == 1  # not even at shutdown
