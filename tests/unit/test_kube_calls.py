"""Every call of the Kubernetes API client as httpx sends it, and what each failure class
becomes, with respx standing in for the transport (socket-level behaviour: test_kube.py).
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import kopf
import pytest
import respx

from jobwatch.core.patch import Fence
from jobwatch.core.refs import ObjectRef
from jobwatch.kube import client as kubeclient
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError, Expired, Unreachable

SERVER = "https://api.test:6443"
REF = ObjectRef("ns", "build-1", "uid-1")
JW = "/apis/jobwatch.dev/v1alpha1"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/ops/leases"


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=SERVER, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    client = KubeApi(lambda: kopf.ConnectionInfo(server=SERVER, token="tok", insecure=True))
    yield client
    await client.aclose()


def sent(route: respx.Route, n: int = 0) -> httpx.Request:
    return route.calls[n].request


def common_headers(request: httpx.Request) -> None:
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["user-agent"] == "jobwatch-operator"
    assert request.headers["accept"] == "application/json"


async def test_patch_status(mock: respx.MockRouter, api: KubeApi) -> None:
    route = mock.patch(f"{JW}/namespaces/ns/jobwatches/build-1/status").respond(200, json={})
    await api.patch_status(REF, {"phase": "Polling"})
    request = sent(route)
    common_headers(request)
    assert request.headers["content-type"] == "application/json-patch+json"
    assert json.loads(request.content) == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
        {"op": "add", "path": "/status", "value": {"phase": "Polling"}},
    ]


async def test_a_fenced_patch_tests_the_stored_holder_and_phase(
    mock: respx.MockRouter, api: KubeApi
) -> None:
    route = mock.patch(f"{JW}/namespaces/ns/jobwatches/build-1/status").respond(200, json={})
    await api.patch_status(REF, {"phase": "Polling"}, Fence(True, "replica-a", "Pending"))
    await api.patch_status(REF, {"phase": "Polling"}, Fence(True, None, None))
    await api.patch_status(REF, {"phase": "Polling"}, Fence(False, None, None))
    bodies = [json.loads(call.request.content) for call in route.calls]
    tests = [[op for op in ops if op["op"] == "test"] for ops in bodies]
    uid = {"op": "test", "path": "/metadata/uid", "value": "uid-1"}
    assert tests == [
        [
            uid,
            {"op": "test", "path": "/status/holder", "value": "replica-a"},
            {"op": "test", "path": "/status/phase", "value": "Pending"},
        ],
        [
            uid,
            {"op": "test", "path": "/status/holder", "value": None},
            {"op": "test", "path": "/status/phase", "value": None},
        ],
        [uid, {"op": "test", "path": "/status", "value": None}],
    ]


async def test_a_patch_refused_by_a_test_is_told_from_one_refused_by_the_schema(
    mock: respx.MockRouter, api: KubeApi
) -> None:
    # The answers of kube-apiserver 1.35 (tests/e2e/test_status_fence.py).
    failed_test = {"kind": "Status", "code": 422, "reason": "Invalid", "details": {}}
    failed_test["message"] = "the server rejected our request due to an error in our request"
    schema = {
        "kind": "Status",
        "code": 422,
        "reason": "Invalid",
        "message": 'JobWatch.jobwatch.dev "build-1" is invalid: status.phase: Unsupported value',
        "details": {"name": "build-1", "causes": [{"field": "status.phase"}]},
    }
    route = mock.patch(f"{JW}/namespaces/ns/jobwatches/build-1/status")
    route.side_effect = [httpx.Response(422, json=failed_test), httpx.Response(422, json=schema)]
    refusals = []
    for _ in range(2):
        with pytest.raises(ApiError) as refused:
            await api.patch_status(REF, {"phase": "Polling"}, Fence(True, "a", "Polling"))
        refusals.append((refused.value.status, refused.value.not_applied))
    assert refusals == [(422, True), (422, False)]


@pytest.mark.parametrize(
    ("code", "body", "found"),
    [
        (200, {"metadata": {"uid": "uid-1"}, "status": {"phase": "Succeeded"}}, True),
        (200, {"metadata": {"uid": "uid-2"}, "status": {"phase": "Succeeded"}}, False),
        (404, {"kind": "Status", "code": 404}, False),
    ],
)
async def test_get_jobwatch(
    mock: respx.MockRouter, api: KubeApi, code: int, body: dict[str, Any], found: bool
) -> None:
    route = mock.get(f"{JW}/namespaces/ns/jobwatches/build-1").respond(code, json=body)
    got = await api.get_jobwatch(REF)
    assert got == (body if found else None)  # a namesake with another uid is not it
    common_headers(sent(route))


async def test_get_secret(mock: respx.MockRouter, api: KubeApi) -> None:
    data = {"token": base64.b64encode(b"v").decode()}
    body = {"metadata": {"labels": {"a": "b"}}, "data": data}
    route = mock.get("/api/v1/namespaces/ns/secrets/creds").respond(200, json=body)
    secret = await api.get_secret("ns", "creds")
    assert secret is not None
    assert (dict(secret.labels), dict(secret.data)) == ({"a": "b"}, {"token": b"v"})
    common_headers(sent(route))
    assert sent(route).content == b""


async def test_create_event_standing_for_several(mock: respx.MockRouter, api: KubeApi) -> None:
    # What the Event holds about its object: test_kube.py. Here: the count and times.
    route = mock.post("/api/v1/namespaces/ns/events").respond(201, json={})
    first = datetime.datetime(2026, 12, 1, 8, 0, 0, tzinfo=datetime.UTC)
    await api.create_event(
        REF, warning=True, reason="Failed", message="m", count=3, first_seen=first
    )
    request = sent(route)
    common_headers(request)
    assert request.headers["content-type"] == "application/json"
    event = json.loads(request.content)
    assert (event["count"], event["firstTimestamp"]) == (3, "2026-12-01T08:00:00Z")
    assert event["lastTimestamp"] > event["firstTimestamp"]


async def test_list_jobwatches_in_pages(mock: respx.MockRouter, api: KubeApi) -> None:
    route = mock.get(f"{JW}/namespaces/ns/jobwatches").mock(
        side_effect=[
            httpx.Response(200, json={"items": [{"n": 1}], "metadata": {"continue": "c"}}),
            httpx.Response(200, json={"items": [{"n": 2}], "metadata": {"resourceVersion": "9"}}),
        ]
    )
    pages = [page async for page in api.list_jobwatches("ns", (("team", "a"),))]
    assert pages == [([{"n": 1}], None), ([{"n": 2}], "9")]
    assert [dict(call.request.url.params) for call in route.calls] == [
        {"limit": "500", "labelSelector": "team=a"},
        {"limit": "500", "labelSelector": "team=a", "continue": "c"},
    ]


async def test_watch_jobwatches(mock: respx.MockRouter, api: KubeApi) -> None:
    lines = b'{"type":"ADDED","object":{"n":1}}\n{"type":"BOOKMARK","object":{"n":2}}\n'
    route = mock.get(f"{JW}/jobwatches").respond(200, content=lines)
    events = [e async for e in api.watch_jobwatches(None, "5", server_timeout=60)]
    assert events == [("ADDED", {"n": 1}), ("BOOKMARK", {"n": 2})]
    assert dict(sent(route).url.params) == {
        "watch": "true",
        "resourceVersion": "5",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "60",
    }


async def test_leases(mock: respx.MockRouter, api: KubeApi) -> None:
    listed = mock.get(LEASES).respond(200, json={"items": [{"n": 1}]})
    created = mock.post(LEASES).respond(201, json={"created": True})
    replaced = mock.put(f"{LEASES}/b-000").respond(200, json={"replaced": True})
    deleted = mock.delete(f"{LEASES}/b-000").respond(404, json={})
    body = {"metadata": {"name": "b-000", "resourceVersion": "3"}}
    assert await api.list_leases("ops", "group=jw") == [{"n": 1}]
    assert await api.create_lease("ops", body) == {"created": True}
    assert await api.replace_lease("ops", "b-000", body) == {"replaced": True}
    await api.delete_lease("ops", "b-000")  # already gone: fine
    assert dict(sent(listed).url.params) == {"labelSelector": "group=jw"}
    for route in (created, replaced):
        assert json.loads(sent(route).content) == body
        assert sent(route).headers["content-type"] == "application/json"
    assert sent(deleted).content == b""


# --- failure classes ---------------------------------------------------------------

Call = Callable[[KubeApi], Awaitable[Any]]
WRITES: list[tuple[str, str, Call]] = [
    ("PATCH", f"{JW}/namespaces/ns/jobwatches/build-1/status",
     lambda api: api.patch_status(REF, {"phase": "Polling"})),
    ("POST", "/api/v1/namespaces/ns/events",
     lambda api: api.create_event(REF, warning=False, reason="Started", message="m")),
    ("POST", LEASES, lambda api: api.create_lease("ops", {"metadata": {}})),
    ("PUT", f"{LEASES}/b-000", lambda api: api.replace_lease("ops", "b-000", {"metadata": {}})),
    ("DELETE", f"{LEASES}/b-000", lambda api: api.delete_lease("ops", "b-000")),
]  # fmt: skip
READ: tuple[str, str, Call] = (
    "GET",
    "/api/v1/namespaces/ns/secrets/creds",
    lambda api: api.get_secret("ns", "creds"),
)
BROKEN = [
    pytest.param(httpx.ConnectError("refused"), id="refused"),
    pytest.param(httpx.ReadError("reset"), id="reset"),
    pytest.param(httpx.RemoteProtocolError("closed without an answer"), id="closed"),
]


@pytest.mark.parametrize("error", BROKEN)
@pytest.mark.parametrize("write", WRITES, ids=[w[0] + w[1] for w in WRITES])
async def test_a_write_is_never_sent_twice(
    mock: respx.MockRouter, api: KubeApi, write: tuple[str, str, Call], error: Exception
) -> None:
    method, path, call = write
    route = mock.route(method=method, path=path).mock(side_effect=[error, httpx.Response(200)])
    with pytest.raises(Unreachable):
        await call(api)
    assert route.call_count == 1


@pytest.mark.parametrize("error", BROKEN)
async def test_a_read_is_sent_once_more_after_a_broken_connection(
    mock: respx.MockRouter, api: KubeApi, error: Exception
) -> None:
    method, path, call = READ
    route = mock.route(method=method, path=path).mock(
        side_effect=[error, httpx.Response(404), httpx.Response(200)]
    )
    assert await call(api) is None
    assert route.call_count == 2


async def test_a_read_broken_twice_is_unreachable(mock: respx.MockRouter, api: KubeApi) -> None:
    method, path, call = READ
    route = mock.route(method=method, path=path).mock(side_effect=httpx.ReadError("reset"))
    with pytest.raises(Unreachable, match="ReadError: reset"):
        await call(api)
    assert route.call_count == 2


@pytest.mark.parametrize(("method", "path", "call"), [*WRITES, READ])
async def test_a_timeout_is_unreachable_and_not_sent_again(
    mock: respx.MockRouter, api: KubeApi, method: str, path: str, call: Call
) -> None:
    route = mock.route(method=method, path=path).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(Unreachable, match="ReadTimeout"):
        await call(api)
    assert route.call_count == 1


async def test_a_401_logs_in_again_and_sends_once_more(mock: respx.MockRouter) -> None:
    tokens = iter(["old", "new"])
    api = KubeApi(lambda: kopf.ConnectionInfo(server=SERVER, token=next(tokens), insecure=True))
    route = mock.post(LEASES).mock(side_effect=[httpx.Response(401), httpx.Response(201, json={})])
    try:
        await api.create_lease("ops", {"metadata": {}})
    finally:
        await api.aclose()
    assert [c.request.headers["authorization"] for c in route.calls] == [
        "Bearer old",
        "Bearer new",
    ]


@pytest.mark.parametrize(
    ("code", "gone", "retriable"),
    [(403, False, True), (404, True, False), (409, True, False), (500, False, True),
     (503, False, True)],
)  # fmt: skip
async def test_an_error_answer_says_whether_to_retry(
    mock: respx.MockRouter, api: KubeApi, code: int, gone: bool, retriable: bool
) -> None:
    route = mock.put(f"{LEASES}/b-000").respond(code, json={"message": "no"})
    with pytest.raises(ApiError) as raised:
        await api.replace_lease("ops", "b-000", {"metadata": {}})
    assert (raised.value.status, raised.value.gone, raised.value.retriable) == (
        code,
        gone,
        retriable,
    )
    assert route.call_count == 1


async def test_410_means_list_again(mock: respx.MockRouter, api: KubeApi) -> None:
    mock.get(f"{JW}/jobwatches").respond(410, json={"message": "too old"})
    with pytest.raises(Expired):
        async for _ in api.list_jobwatches(None):
            pass
    with pytest.raises(Expired):
        async for _ in api.watch_jobwatches(None, "5"):
            pass


async def test_a_429_with_retry_after_is_sent_again_after_it(
    mock: respx.MockRouter, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(kubeclient.asyncio, "sleep", sleep)
    throttled = httpx.Response(429, headers={"retry-after": "2"}, json={"message": "slow"})
    route = mock.patch(f"{JW}/namespaces/ns/jobwatches/build-1/status").mock(
        side_effect=[throttled, httpx.Response(200, json={})]
    )
    await api.patch_status(REF, {"phase": "Polling"})
    assert (route.call_count, waited) == (2, [2.0])


async def test_a_429_that_goes_on_reaches_the_caller(
    mock: respx.MockRouter, api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def sleep(seconds: float) -> None:
        pass

    monkeypatch.setattr(kubeclient.asyncio, "sleep", sleep)
    route = mock.post(LEASES).respond(429, headers={"retry-after": "1"}, json={"message": "busy"})
    no_hint = mock.put(f"{LEASES}/b-000").respond(429, json={"message": "busy"})
    with pytest.raises(ApiError) as raised:
        await api.create_lease("ops", {"metadata": {}})
    assert (raised.value.status, raised.value.retriable) == (429, True)
    assert route.call_count == 1 + kubeclient.MAX_THROTTLED
    with pytest.raises(ApiError):
        await api.replace_lease("ops", "b-000", {"metadata": {}})
    assert no_hint.call_count == 1
