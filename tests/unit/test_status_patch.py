"""One status write: only the fields that changed, what the API server cannot take,
and the fence (status.holder, a JSON-patch test, repair on refusal, the lease gate)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from status_fakes import RETRY_WAIT, FakeApi, make_watch, make_writer, until

from jobwatch.control.status import writer as status
from jobwatch.control.status.writer import StatusWriter
from jobwatch.core import patch as statuspatch
from jobwatch.core.patch import Fence
from jobwatch.core.policy import Phase
from jobwatch.core.refs import ObjectRef
from jobwatch.core.watch import Watch
from jobwatch.kits.metrics import Metrics
from jobwatch.kube import errors as kubeerrors
from jobwatch.kube.errors import ApiError


async def test_a_status_that_cannot_be_encoded_is_written_without_the_endpoint_parts() -> None:
    api = FakeApi()
    writer = make_writer(api)
    watch = make_watch(phase=Phase.SUCCEEDED, result={"x": float("nan")})
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)
    ((_, written),) = api.patches
    assert written["phase"] == "Succeeded"
    assert "result" not in written
    assert "not encodable" in written["message"]


async def test_a_status_refused_as_invalid_is_written_again_without_the_endpoint_parts() -> None:
    api = FakeApi(fail_with=ApiError(422, "status.result: Too long"))
    writer = make_writer(api)
    watch = make_watch(phase=Phase.SUCCEEDED, result={"big": "x"})
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)
    ((_, written),) = api.patches
    assert written["phase"] == "Succeeded"
    assert "result" not in written
    assert "refused by the API server (HTTP 422)" in written["message"]


class WireApi(FakeApi):
    """Records the JSON patch each write sends: in `sent` what it writes, in `fences` the
    tests of the status after the uid's; fails the writes `refuse` says to."""

    def __init__(self, refuse: Callable[[list[dict[str, Any]]], ApiError | None]) -> None:
        super().__init__()
        self.sent: list[list[dict[str, Any]]] = []
        self.fences: list[list[dict[str, Any]]] = []
        self.refuse = refuse

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        ops = json.loads(statuspatch.status_patch(ref.uid, status, fence))
        assert ops[0] == {"op": "test", "path": "/metadata/uid", "value": ref.uid}
        self.fences.append([op for op in ops[1:] if op["op"] == "test"])
        ops = [op for op in ops if op["op"] != "test"]
        self.sent.append(ops)
        error = self.refuse(ops)
        if error is not None:
            raise error
        self.patches.append((ref, status))


def paths(ops: list[dict[str, Any]]) -> list[str]:
    return [op["path"] for op in ops]


async def write(writer: StatusWriter, watch: Watch) -> None:
    writer.submit(watch, urgent=True)
    await writer.flush(1.0)


async def test_a_write_sends_only_the_fields_that_changed_and_whole_when_one_goes() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch(phase=Phase.POLLING, next_poll_time=time.time() + 5)
    await write(writer, watch)
    watch.attempts, watch.last_response = 1, {"code": 200, "latencyMs": 3, "body": "{}"}
    watch.last_poll_time = time.time()
    await write(writer, watch)
    watch.phase, watch.reason, watch.completion_time = Phase.SUCCEEDED, "Done", time.time()
    await write(writer, watch)  # nextPollTime goes: only a whole status can say so
    assert [paths(ops) for ops in api.sent] == [
        ["/status"],
        ["/status/attempts", "/status/lastPollTime", "/status/lastResponse"],
        ["/status"],
    ]
    assert api.sent[1][2]["value"] == {"code": 200, "latencyMs": 3, "body": "{}"}
    assert "nextPollTime" not in api.sent[2][0]["value"]


async def test_nulls_in_a_changed_result_stay() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch(result={"a": 1})
    await write(writer, watch)
    watch.result = {"a": None, "b": [None]}
    await write(writer, watch)
    assert api.sent[1] == [{"op": "add", "path": "/status/result", "value": watch.result}]


async def test_fields_the_object_cannot_take_are_written_whole_instead() -> None:
    # The new values are refused as fields (by the schema), not by a test of the patch.
    api = WireApi(lambda ops: ApiError(422, "doc is missing path") if len(ops) > 1 else None)
    writer = make_writer(api)
    watch = make_watch()
    await write(writer, watch)
    watch.attempts, watch.consecutive_errors = 3, 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [
        ["/status"],
        ["/status/attempts", "/status/consecutiveErrors"],
        ["/status"],
    ]
    assert api.sent[2][0]["value"]["attempts"] == 3
    assert len(api.patches) == 2


async def test_after_a_status_written_without_the_endpoints_parts_the_next_goes_whole() -> None:
    def refuse(ops: list[dict[str, Any]]) -> ApiError | None:
        value = ops[0]["value"]
        too_big = isinstance(value, dict) and value.get("result") == "x" * 100
        return ApiError(422, "result: Too long") if too_big else None

    api = WireApi(refuse)
    writer = make_writer(api)
    watch = make_watch(result="x" * 100)
    await write(writer, watch)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"]] * 4
    assert [("result" in ops[0]["value"]) for ops in api.sent] == [True, False, True, False]


async def test_a_forgotten_object_is_written_whole_again() -> None:
    api = WireApi(lambda ops: None)
    writer = make_writer(api)
    watch = make_watch()
    await write(writer, watch)
    writer.forget(watch.ref)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"], ["/status"]]


# --- The fence: status.holder, a JSON-patch test, repair on refusal, the lease gate -----


class StoredApi(FakeApi):
    """One JobWatch's stored status, patched as kube-apiserver patches it: the patch's
    `test`s are checked (a missing field is null), and one failing refuses the whole
    patch with the answer the real server gives (422, PATCH_NOT_APPLIED)."""

    def __init__(self, ref: ObjectRef, stored: dict[str, Any], generation: int = 1) -> None:
        super().__init__()
        self.ref, self.stored, self.generation = ref, stored, generation
        self.gets = 0
        self.sent: list[list[dict[str, Any]]] = []

    async def patch_status(
        self, ref: ObjectRef, status: dict[str, Any], fence: Fence | None = None
    ) -> None:
        ops = json.loads(statuspatch.status_patch(ref.uid, status, fence))
        self.sent.append(ops)
        for op in ops:
            if op["op"] == "test" and op["path"] != "/metadata/uid":
                key = op["path"].removeprefix("/status").removeprefix("/")
                held = self.stored.get(key) if key else self.stored
                if held != op["value"]:
                    raise ApiError(422, kubeerrors.PATCH_NOT_APPLIED)
        for op in ops:
            if op["op"] == "add" and op["path"] == "/status":
                self.stored = op["value"]
            elif op["op"] == "add":
                self.stored[op["path"].removeprefix("/status/")] = op["value"]
        self.patches.append((ref, status))

    async def get_jobwatch(self, ref: ObjectRef) -> dict[str, Any] | None:
        self.gets += 1
        meta = {"namespace": ref.namespace, "name": ref.name, "uid": ref.uid}
        return {"metadata": {**meta, "generation": self.generation}, "status": self.stored}


def results(metrics: Metrics, *names: str) -> dict[str, float]:
    return {
        name: metrics.registry.get_sample_value("jobwatch_status_writes_total", {"result": name})
        or 0.0
        for name in names
    }


async def test_every_status_says_who_wrote_it_and_tests_what_its_writer_last_knew() -> None:
    watch = make_watch(phase=Phase.PENDING)
    api = StoredApi(watch.ref, {"observedGeneration": 0})  # never written: the CRD default
    writer = make_writer(api)
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    watch.phase = Phase.POLLING
    await write(writer, watch)
    fences = [[op for op in ops[1:] if op["op"] == "test"] for ops in api.sent]
    assert fences == [
        [
            {"op": "test", "path": "/status/holder", "value": None},
            {"op": "test", "path": "/status/phase", "value": None},
        ],
        [
            {"op": "test", "path": "/status/holder", "value": "me"},
            {"op": "test", "path": "/status/phase", "value": "Pending"},
        ],
    ]
    assert (api.stored["holder"], api.stored["phase"]) == ("me", "Polling")


async def test_a_write_refused_by_its_fence_reads_the_object_once_and_writes_whole_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    watch = make_watch(phase=Phase.POLLING, attempts=3)
    api = StoredApi(watch.ref, {"observedGeneration": 0})
    writer = make_writer(api, metrics=metrics)
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    # Another replica writes meanwhile (it took the object over, say): not an end.
    api.stored = {**api.stored, "holder": "replica-b", "attempts": 4}
    watch.attempts = 5
    writer.submit(watch, urgent=True)
    await writer.flush(status.RETRY_DELAY + 1)  # the rewrite comes after the retry delay
    assert api.gets == 1
    assert len(api.sent) == 3  # written, refused, written again
    refused, again = api.sent[1], api.sent[2]
    assert [op["path"] for op in refused if op["op"] == "add"] == ["/status/attempts"]
    assert [op for op in again if op["op"] != "add"][1:] == [
        {"op": "test", "path": "/status/holder", "value": "replica-b"},
        {"op": "test", "path": "/status/phase", "value": "Polling"},
    ]
    assert [op["path"] for op in again if op["op"] == "add"] == ["/status"]  # whole
    assert (api.stored["holder"], api.stored["attempts"]) == ("me", 5)
    assert results(metrics, "written", "refused", "repaired") == {
        "written": 1,
        "refused": 1,
        "repaired": 1,
    }
    assert caplog.text.count("refused: its status was written meanwhile by replica-b") == 1


async def test_an_end_another_replica_wrote_stands_and_goes_to_the_runtime() -> None:
    metrics = Metrics()
    watch = make_watch(phase=Phase.POLLING)
    api = StoredApi(watch.ref, {"observedGeneration": 0})
    ended: list[dict[str, Any]] = []
    writer = StatusWriter(
        api,  # type: ignore[arg-type]
        metrics,
        qps=1000,
        burst=1000,
        event_qps=1000,
        event_burst=1000,
        progress_interval=60,
        wall=time.time,
        clock=time.monotonic,
        identity="me",
        on_foreign_end=ended.append,
    )
    writer.stored(watch.ref, api.stored)
    await write(writer, watch)
    end = {"holder": "replica-b", "phase": "Succeeded", "observedGeneration": 1}
    api.stored = dict(end)
    watch.attempts = 1  # this replica, stale, still has progress to write
    await write(writer, watch)
    await asyncio.sleep(status.RETRY_DELAY + 0.3)  # no rewrite comes, not even later
    assert api.stored == end
    assert api.gets == 1
    assert [body["status"] for body in ended] == [end]
    assert len(api.patches) == 1
    assert writer.pending == 0


async def test_the_gate_is_asked_at_the_moment_of_sending() -> None:
    """A write that waited for its token, for a retry, or for the answer to its first
    request (refused as invalid, it goes again whole) sends nothing once the object is
    no longer this replica's."""
    metrics = Metrics()
    now = [0.0]
    ours = {"token", "retry"}
    api = WireApi(lambda ops: ApiError(503, "unavailable"))
    writer = StatusWriter(
        api,  # type: ignore[arg-type]
        metrics,
        qps=10,
        burst=1,
        event_qps=1000,
        event_burst=1000,
        progress_interval=60,
        wall=time.time,
        clock=lambda: now[0],
        identity="me",
        may_write=lambda ref: ref.name in ours,
    )
    task = asyncio.create_task(writer.run())
    writer.submit(make_watch("retry"), urgent=True)  # the burst's token; refused: 503
    await until(lambda: len(api.sent) == 1)
    writer.submit(make_watch("token"), urgent=True)  # waits for a token
    await asyncio.sleep(0.05)
    ours.clear()
    now[0] += 10  # a token, for "token"
    await until(lambda: results(metrics, "not_ours")["not_ours"] == 1)
    await until(lambda: writer.pending == 1, timeout=RETRY_WAIT + 1)  # "retry" is back
    now[0] += 10  # a token for it
    await until(lambda: results(metrics, "not_ours")["not_ours"] == 2)
    task.cancel()
    assert len(api.sent) == 1
    assert results(metrics, "not_ours") == {"not_ours": 2}
    assert writer.pending == 0


async def test_the_gate_is_asked_again_before_a_write_goes_whole() -> None:
    metrics = Metrics()
    ours = {"w"}

    def refuse(ops: list[dict[str, Any]]) -> ApiError | None:
        if ops[0]["path"] == "/status":
            return None
        ours.clear()  # the lease ran out while the field patch was out
        return ApiError(422, 'JobWatch "w" is invalid: status.attempts')

    api = WireApi(refuse)
    writer = make_writer(api, metrics=metrics, may_write=lambda ref: ref.name in ours)
    watch = make_watch()
    await write(writer, watch)
    watch.attempts = 1
    await write(writer, watch)
    assert [paths(ops) for ops in api.sent] == [["/status"], ["/status/attempts"]]
    assert results(metrics, "not_ours") == {"not_ours": 1}
