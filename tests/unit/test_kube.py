"""The Kubernetes API client's HTTP handling, with respx in place of the API server.

What the API server itself does with these requests (admission, RBAC, the uid test)
is covered end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import kopf
import pytest
import respx

from jobwatch.kube import ApiError, KubeApi, ObjectRef

SERVER = "https://api.test:6443"
REF = ObjectRef("ns", "build-1", "uid-1")
STATUS_PATH = "/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches/build-1/status"


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=SERVER, assert_all_called=False) as mock:
        yield mock


class Tokens:
    """Credentials as kopf would load them; each load hands out the next token."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.loads = 0

    def __call__(self) -> kopf.ConnectionInfo:
        token = self.tokens[min(self.loads, len(self.tokens) - 1)]
        self.loads += 1
        return kopf.ConnectionInfo(server=SERVER, token=token, insecure=True)


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    client = KubeApi(Tokens("t1"))
    yield client
    await client.aclose()


async def test_status_is_a_json_patch_guarded_by_the_uid(
    router: respx.MockRouter, api: KubeApi
) -> None:
    route = router.patch(STATUS_PATH).respond(200, json={})
    await api.patch_status(REF, {"phase": "Polling", "result": {"a": None}, "lastError": None})
    request = route.calls.last.request
    assert request.headers["content-type"] == "application/json-patch+json"
    assert request.headers["authorization"] == "Bearer t1"
    assert json.loads(request.content) == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
        # Unset fields are left out; nulls inside the result stay.
        {"op": "add", "path": "/status", "value": {"phase": "Polling", "result": {"a": None}}},
    ]


async def test_a_401_loads_the_credentials_again_and_retries_once(
    router: respx.MockRouter,
) -> None:
    tokens = Tokens("old", "new")
    api = KubeApi(tokens)
    route = router.patch(STATUS_PATH).mock(
        side_effect=lambda request: httpx.Response(
            200 if request.headers["authorization"] == "Bearer new" else 401, json={}
        )
    )
    try:
        await api.patch_status(REF, {"phase": "Polling"})
    finally:
        await api.aclose()
    assert [call.request.headers["authorization"] for call in route.calls] == [
        "Bearer old",
        "Bearer new",
    ]
    assert tokens.loads == 2


async def test_a_second_401_is_an_error_not_a_loop(router: respx.MockRouter) -> None:
    tokens = Tokens("bad")
    api = KubeApi(tokens)
    route = router.patch(STATUS_PATH).respond(401, json={"message": "Unauthorized"})
    try:
        with pytest.raises(ApiError) as raised:
            await api.patch_status(REF, {"phase": "Polling"})
    finally:
        await api.aclose()
    assert raised.value.status == 401
    assert route.call_count == 2
    assert tokens.loads == 2


@pytest.mark.parametrize(
    ("code", "gone", "retriable"),
    [(403, False, True), (404, True, False), (409, True, False), (422, False, False),
     (429, False, True), (500, False, True), (503, False, True)],
)  # fmt: skip
async def test_errors_say_whether_the_object_is_gone_or_worth_a_retry(
    router: respx.MockRouter, api: KubeApi, code: int, gone: bool, retriable: bool
) -> None:
    router.patch(STATUS_PATH).respond(code, json={"message": "the test failed"})
    with pytest.raises(ApiError) as raised:
        await api.patch_status(REF, {"phase": "Polling"})
    assert (raised.value.gone, raised.value.retriable) == (gone, retriable)
    assert str(raised.value) == f"HTTP {code}: the test failed"


async def test_an_error_page_that_is_not_json_is_quoted_short(
    router: respx.MockRouter, api: KubeApi
) -> None:
    router.patch(STATUS_PATH).respond(502, text="<html>" + "x" * 500)
    with pytest.raises(ApiError) as raised:
        await api.patch_status(REF, {"phase": "Polling"})
    assert str(raised.value) == "HTTP 502: <html>" + "x" * 194


async def test_secret_data_is_decoded(router: respx.MockRouter, api: KubeApi) -> None:
    token = base64.b64encode(b"s3cr3t").decode()
    router.get("/api/v1/namespaces/ns/secrets/creds").respond(
        200, json={"metadata": {"labels": {"a": "b"}}, "data": {"token": token}}
    )
    secret = await api.get_secret("ns", "creds")
    assert secret is not None
    assert secret.labels == {"a": "b"}
    assert secret.data == {"token": b"s3cr3t"}


@pytest.mark.parametrize("code", [403, 404])
async def test_a_secret_we_cannot_see_is_none(
    router: respx.MockRouter, api: KubeApi, code: int
) -> None:
    router.get("/api/v1/namespaces/ns/secrets/creds").respond(code, json={})
    assert await api.get_secret("ns", "creds") is None


async def test_event_names_the_jobwatch_and_caps_the_message(
    router: respx.MockRouter, api: KubeApi
) -> None:
    route = router.post("/api/v1/namespaces/ns/events").respond(201, json={})
    await api.create_event(REF, warning=True, reason="TimedOut", message="m" * 2000)
    event = json.loads(route.calls.last.request.content)
    assert event["type"] == "Warning"
    assert event["reason"] == "TimedOut"
    assert len(event["message"]) == 1024
    assert event["involvedObject"] == {
        "apiVersion": "jobwatch.dev/v1alpha1",
        "kind": "JobWatch",
        "namespace": "ns",
        "name": "build-1",
        "uid": "uid-1",
    }


async def test_listing_follows_continue_tokens_with_the_label_selector(
    router: respx.MockRouter, api: KubeApi
) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        params = request.url.params
        assert params["limit"] == "500"
        assert params["labelSelector"] == "shard=a,tier=x"
        if params.get("continue") is None:
            return httpx.Response(
                200,
                json={
                    "items": [{"n": 1}, {"n": 2}],
                    "metadata": {"continue": "c1", "resourceVersion": "7"},
                },
            )
        assert params["continue"] == "c1"
        return httpx.Response(200, json={"items": [{"n": 3}], "metadata": {"resourceVersion": "7"}})

    router.get("/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches").mock(side_effect=page)
    pages = [p async for p in api.list_jobwatches("ns", (("shard", "a"), ("tier", "x")))]
    assert pages == [([{"n": 1}, {"n": 2}], "7"), ([{"n": 3}], "7")]


async def test_listing_cluster_wide_and_refused(router: respx.MockRouter, api: KubeApi) -> None:
    router.get("/apis/jobwatch.dev/v1alpha1/jobwatches").respond(
        403, json={"message": "jobwatches.jobwatch.dev is forbidden"}
    )
    with pytest.raises(ApiError, match=r"HTTP 403: jobwatches\.jobwatch\.dev is forbidden"):
        async for _ in api.list_jobwatches(None):
            pass


async def test_the_next_page_is_requested_while_this_one_is_handled(
    router: respx.MockRouter, api: KubeApi
) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params.get("continue") or 0)
        meta = {"resourceVersion": "7", **({"continue": str(n + 1)} if n < 2 else {})}
        return httpx.Response(200, json={"items": [{"n": n}], "metadata": meta})

    route = router.get("/apis/jobwatch.dev/v1alpha1/jobwatches").mock(side_effect=page)
    pages = api.list_jobwatches(None)
    assert await anext(pages) == ([{"n": 0}], "7")
    await asyncio.sleep(0)
    assert route.call_count == 2  # page 1 is on its way before page 0 is taken in
    assert [items async for items, _ in pages] == [[{"n": 1}], [{"n": 2}]]
    assert route.call_count == 3


async def test_abandoning_a_listing_cancels_the_page_in_flight(
    router: respx.MockRouter, api: KubeApi
) -> None:
    router.get("/apis/jobwatch.dev/v1alpha1/jobwatches").respond(
        200, json={"items": [], "metadata": {"resourceVersion": "7", "continue": "c"}}
    )
    pages = api.list_jobwatches(None)
    await anext(pages)
    await pages.aclose()  # no warning about a never-retrieved page
