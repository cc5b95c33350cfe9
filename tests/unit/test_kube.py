"""The Kubernetes API client's HTTP handling, against a loopback stand-in for the API
server (loopback_api.py).

What the API server itself does with these requests (admission, RBAC, the uid test)
is covered end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import kopf
import pytest
from aiohttp import web
from loopback_api import Drop, LoopbackApi, Seen, listing, reply, stream

from jobwatch.core import patch as statuspatch
from jobwatch.core.patch import EncodedStatus
from jobwatch.core.refs import ObjectRef
from jobwatch.kube.api import KubeApi
from jobwatch.kube.errors import ApiError, Expired, Unreachable

REF = ObjectRef("ns", "build-1", "uid-1")
STATUS_PATH = "/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches/build-1/status"
COLLECTION = "/apis/jobwatch.dev/v1alpha1/jobwatches"


def only_for(token: str) -> Callable[[Seen], web.Response]:
    """An API server that takes this token only."""
    return lambda seen: reply(200 if seen.headers["authorization"] == f"Bearer {token}" else 401)


class Tokens:
    """Credentials as kopf would load them; each load hands out the next token."""

    def __init__(self, server: LoopbackApi, *tokens: str) -> None:
        self.server, self.tokens = server, list(tokens)
        self.loads = 0

    def __call__(self) -> kopf.ConnectionInfo:
        token = self.tokens[min(self.loads, len(self.tokens) - 1)]
        self.loads += 1
        return self.server.credentials(token)


async def test_status_is_a_json_patch_guarded_by_the_uid(server: LoopbackApi, api: KubeApi) -> None:
    await api.patch_status(REF, {"phase": "Polling", "result": {"a": None}, "lastError": None})
    [request] = server.path(STATUS_PATH)
    assert request.method == "PATCH"
    assert request.headers["content-type"] == "application/json-patch+json"
    assert request.headers["authorization"] == "Bearer t"
    assert request.json() == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
        # Unset fields are left out; nulls inside the result stay.
        {"op": "add", "path": "/status", "value": {"phase": "Polling", "result": {"a": None}}},
    ]


async def test_a_status_that_says_what_changed_patches_only_those_fields(
    server: LoopbackApi, api: KubeApi
) -> None:
    status = {"phase": "Polling", "attempts": 4, "result": {"a": None}}
    texts = {key: statuspatch.encode_json(value) for key, value in status.items()}
    await api.patch_status(REF, EncodedStatus(status, texts, ("attempts", "result")))
    assert server.path(STATUS_PATH)[0].json() == [
        {"op": "test", "path": "/metadata/uid", "value": "uid-1"},
        {"op": "add", "path": "/status/attempts", "value": 4},
        {"op": "add", "path": "/status/result", "value": {"a": None}},
    ]


async def test_a_401_loads_the_credentials_again_and_retries_once(server: LoopbackApi) -> None:
    tokens = Tokens(server, "old", "new")
    server.answer = lambda seen: reply(
        200 if seen.headers["authorization"] == "Bearer new" else 401
    )
    api = KubeApi(tokens)
    try:
        await api.patch_status(REF, {"phase": "Polling"})
    finally:
        await api.aclose()
    assert [seen.headers["authorization"] for seen in server.seen] == ["Bearer old", "Bearer new"]
    assert tokens.loads == 2


async def test_a_second_401_is_an_error_not_a_loop(server: LoopbackApi) -> None:
    tokens = Tokens(server, "bad")
    server.answer = lambda seen: reply(401, {"message": "Unauthorized"})
    api = KubeApi(tokens)
    try:
        with pytest.raises(ApiError) as raised:
            await api.patch_status(REF, {"phase": "Polling"})
    finally:
        await api.aclose()
    assert raised.value.status == 401
    assert len(server.seen) == 2
    assert tokens.loads == 2


async def test_requests_refused_together_log_in_again_once(server: LoopbackApi) -> None:
    tokens = Tokens(server, "old", "new", "newer")
    server.answer = lambda seen: reply(
        200 if seen.headers["authorization"] == "Bearer new" else 401
    )
    api = KubeApi(tokens)
    try:
        await asyncio.gather(*(api.patch_status(REF, {"phase": "Polling"}) for _ in range(5)))
    finally:
        await api.aclose()
    assert tokens.loads == 2


@pytest.mark.parametrize(
    ("code", "gone", "retriable"),
    [(403, False, True), (404, True, False), (409, True, False), (422, False, False),
     (429, False, True), (500, False, True), (503, False, True)],
)  # fmt: skip
async def test_errors_say_whether_the_object_is_gone_or_worth_a_retry(
    server: LoopbackApi, api: KubeApi, code: int, gone: bool, retriable: bool
) -> None:
    server.answer = lambda seen: reply(code, {"message": "the test failed"})
    with pytest.raises(ApiError) as raised:
        await api.patch_status(REF, {"phase": "Polling"})
    assert (raised.value.gone, raised.value.retriable) == (gone, retriable)
    assert str(raised.value) == f"HTTP {code}: the test failed"


async def test_an_error_page_that_is_not_json_is_quoted_short(
    server: LoopbackApi, api: KubeApi
) -> None:
    server.answer = lambda seen: web.Response(status=502, text="<html>" + "x" * 500)
    with pytest.raises(ApiError) as raised:
        await api.patch_status(REF, {"phase": "Polling"})
    assert str(raised.value) == "HTTP 502: <html>" + "x" * 194


async def test_no_answer_is_unreachable(server: LoopbackApi, api: KubeApi) -> None:
    def drop(seen: Seen) -> web.Response:
        raise Drop

    server.answer = drop
    with pytest.raises(Unreachable):
        await api.patch_status(REF, {"phase": "Polling"})


async def test_a_server_that_is_not_there_is_unreachable(unused_tcp_port: int) -> None:
    api = KubeApi(
        lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{unused_tcp_port}", insecure=True)
    )
    try:
        with pytest.raises(Unreachable):
            await api.get_secret("ns", "creds")
    finally:
        await api.aclose()


async def test_secret_data_is_decoded(server: LoopbackApi, api: KubeApi) -> None:
    token = base64.b64encode(b"s3cr3t").decode()
    server.answer = lambda seen: reply(
        200, {"metadata": {"labels": {"a": "b"}}, "data": {"token": token}}
    )
    secret = await api.get_secret("ns", "creds")
    assert server.seen[0].path == "/api/v1/namespaces/ns/secrets/creds"
    assert secret is not None
    assert secret.labels == {"a": "b"}
    assert secret.data == {"token": b"s3cr3t"}


async def test_a_missing_secret_is_none(server: LoopbackApi, api: KubeApi) -> None:
    server.answer = lambda seen: reply(404)
    assert await api.get_secret("ns", "creds") is None


async def test_a_secret_we_may_not_read_is_told_apart(server: LoopbackApi, api: KubeApi) -> None:
    server.answer = lambda seen: reply(403)
    secret = await api.get_secret("ns", "creds")
    assert secret is not None
    assert not secret.readable
    assert not secret.data


async def test_event_names_the_jobwatch_and_caps_the_message(
    server: LoopbackApi, api: KubeApi
) -> None:
    server.answer = lambda seen: reply(201)
    await api.create_event(REF, warning=True, reason="TimedOut", message="m" * 2000)
    [request] = server.path("/api/v1/namespaces/ns/events")
    assert request.method == "POST"
    event = request.json()
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
    server: LoopbackApi, api: KubeApi
) -> None:
    def page(seen: Seen) -> web.Response:
        assert seen.query["limit"] == "500"
        assert seen.query["labelSelector"] == "shard=a,tier=x"
        if seen.query.get("continue") is None:
            return listing("7", {"n": 1}, {"n": 2}, token="c1")
        assert seen.query["continue"] == "c1"
        return listing("7", {"n": 3})

    server.answer = page
    pages = [p async for p in api.list_jobwatches("ns", (("shard", "a"), ("tier", "x")))]
    assert pages == [([{"n": 1}, {"n": 2}], "7"), ([{"n": 3}], "7")]
    assert {seen.path for seen in server.seen} == {
        "/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches"
    }


async def test_listing_cluster_wide_and_refused(server: LoopbackApi, api: KubeApi) -> None:
    server.answer = lambda seen: reply(403, {"message": "jobwatches.jobwatch.dev is forbidden"})
    with pytest.raises(ApiError, match=r"HTTP 403: jobwatches\.jobwatch\.dev is forbidden"):
        async for _ in api.list_jobwatches(None):
            pass
    assert server.seen[0].path == COLLECTION


async def test_the_next_page_is_requested_while_this_one_is_handled(
    server: LoopbackApi, api: KubeApi
) -> None:
    def page(seen: Seen) -> web.Response:
        n = int(seen.query.get("continue") or 0)
        return listing("7", {"n": n}, token=str(n + 1) if n < 2 else None)

    server.answer = page
    pages = api.list_jobwatches(None)
    assert await anext(pages) == ([{"n": 0}], "7")
    async with asyncio.timeout(5):
        while len(server.seen) < 2:  # page 1 is on its way before page 0 is taken in
            await asyncio.sleep(0.01)
    assert [items async for items, _ in pages] == [[{"n": 1}], [{"n": 2}]]
    assert len(server.seen) == 3


async def test_abandoning_a_listing_cancels_the_page_in_flight(
    server: LoopbackApi, api: KubeApi
) -> None:
    server.answer = lambda seen: listing("7", token="c")
    pages = api.list_jobwatches(None)
    await anext(pages)
    await pages.aclose()  # no warning about a never-retrieved page


async def test_a_watch_reads_events_of_any_size(server: LoopbackApi, api: KubeApi) -> None:
    big = {"metadata": {"name": "big"}, "spec": {"pad": "x" * 3_000_000}}
    server.answer = lambda seen: stream(("ADDED", {"metadata": {"name": "a"}}), ("MODIFIED", big))
    opened: list[bool] = []
    events = [
        e
        async for e in api.watch_jobwatches(
            None, "5", (("a", "b"),), 60, opened=lambda: opened.append(True)
        )
    ]
    assert events == [("ADDED", {"metadata": {"name": "a"}}), ("MODIFIED", big)]
    assert opened == [True]
    query = server.seen[0].query
    assert query == {
        "watch": "true",
        "resourceVersion": "5",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "60",
        "labelSelector": "a=b",
    }


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (lambda seen: reply(410, {"message": "too old"}), Expired),
        (lambda seen: stream(("ERROR", {"code": 410, "message": "too old"})), Expired),
        (lambda seen: reply(500, {"message": "etcd"}), ApiError),
    ],
)
async def test_a_watch_that_fails_says_whether_to_list_again(
    server: LoopbackApi, api: KubeApi, answer: object, raised: type[Exception]
) -> None:
    server.answer = answer  # type: ignore[assignment]
    with pytest.raises(raised):
        async for _ in api.watch_jobwatches(None, "5"):
            pass


async def test_a_watch_refused_with_401_logs_in_again(server: LoopbackApi) -> None:
    tokens = Tokens(server, "old", "new")
    server.answer = lambda seen: (
        stream(("ADDED", {"n": 1})) if seen.headers["authorization"] == "Bearer new" else reply(401)
    )
    api = KubeApi(tokens)
    try:
        events = [e async for e in api.watch_jobwatches(None, "5")]
    finally:
        await api.aclose()
    assert events == [("ADDED", {"n": 1})]
    assert tokens.loads == 2


# --- deletion after spec.ttlSecondsAfterFinished (issue #23) ------------------------------

OBJECT_PATH = "/apis/jobwatch.dev/v1alpha1/namespaces/ns/jobwatches/build-1"


async def test_a_delete_names_the_uid_and_the_version_decided_on(
    server: LoopbackApi, api: KubeApi
) -> None:
    server.answer = lambda seen: reply(200, {"kind": "JobWatch"})
    assert await api.delete_jobwatch(REF, "4711") is True
    [request] = server.path(OBJECT_PATH)
    assert request.method == "DELETE"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": {"uid": "uid-1", "resourceVersion": "4711"},
    }


async def test_a_delete_accepted_for_later_is_a_deletion(server: LoopbackApi, api: KubeApi) -> None:
    # 202: another controller's finalizer holds the object; its deletion has started.
    server.answer = lambda seen: reply(202, {"kind": "JobWatch"})
    assert await api.delete_jobwatch(REF, "1") is True


async def test_nothing_to_delete_is_not_an_error(server: LoopbackApi, api: KubeApi) -> None:
    server.answer = lambda seen: reply(404, {"message": "not found"})
    assert await api.delete_jobwatch(REF, "1") is False


@pytest.mark.parametrize("code", [409, 403, 500])
async def test_a_refused_delete_says_why(server: LoopbackApi, api: KubeApi, code: int) -> None:
    message = (
        'Operation cannot be fulfilled on JobWatch.jobwatch.dev "build-1": the UID in the '
        "precondition (uid-1) does not match the UID in record (uid-2). The object might have "
        "been deleted and then recreated"
    )
    server.answer = lambda seen: reply(code, {"message": message})
    with pytest.raises(ApiError) as raised:
        await api.delete_jobwatch(REF, "1")
    assert (raised.value.status, raised.value.message) == (code, message)


async def test_a_delete_whose_answer_is_lost_is_not_sent_again(
    server: LoopbackApi, api: KubeApi
) -> None:
    server.answer = never
    with pytest.raises(Unreachable):
        await api.delete_jobwatch(REF, "1")
    assert [seen.method for seen in server.seen] == ["DELETE"]


# --- what a connection failure, a slow server or a re-login do (issue #19) --------------


def never(seen: Seen) -> web.Response:
    raise Drop


async def test_a_write_whose_answer_is_lost_is_sent_once(server: LoopbackApi, api: KubeApi) -> None:
    # Idle kept-alive connections in the pool first: the old client sent the write again
    # on each of them, and once more on a new one.
    await asyncio.gather(*(api.get_secret("ns", f"s{n}") for n in range(4)))
    server.answer = never
    with pytest.raises(Unreachable):
        await api.create_event(REF, warning=False, reason="Started", message="m")
    with pytest.raises(Unreachable):
        await api.patch_status(REF, {"phase": "Polling"})
    assert [seen.method for seen in server.seen[4:]] == ["POST", "PATCH"]


async def test_a_read_whose_answer_is_lost_is_sent_once_more(
    server: LoopbackApi, api: KubeApi
) -> None:
    answers = iter([never, lambda seen: reply(404)])

    def answer(seen: Seen) -> web.Response:
        return next(answers)(seen)

    server.answer = answer
    assert await api.get_secret("ns", "creds") is None
    assert [seen.method for seen in server.seen] == ["GET", "GET"]


async def test_watch_streams_do_not_hold_back_requests(server: LoopbackApi, api: KubeApi) -> None:
    # 20 namespaces' watch streams stay open; status writes and Lease renewals go on.
    opened, ended = asyncio.Event(), asyncio.Event()

    async def answer(seen: Seen) -> web.StreamResponse:
        if seen.query.get("watch") == "true":
            if sum(1 for s in server.seen if s.query.get("watch")) == 20:
                opened.set()
            await ended.wait()  # the stream stays open until the test ends
            return stream()
        return reply(200, {"metadata": {}})

    server.answer = answer

    async def follow(namespace: str) -> None:
        async for _ in api.watch_jobwatches(namespace, "1"):
            pass

    streams = [asyncio.create_task(follow(f"ns{n}")) for n in range(20)]
    try:
        await asyncio.wait_for(opened.wait(), 5)
        async with asyncio.timeout(2):
            await asyncio.gather(
                *(api.patch_status(REF, {"phase": "Polling"}) for _ in range(16)),
                api.replace_lease("ops", "bucket-000", {"metadata": {}}),
            )
    finally:
        ended.set()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)


async def test_an_answer_that_trickles_ends_at_the_deadline(server: LoopbackApi) -> None:
    async def trickle(seen: Seen) -> web.StreamResponse:
        assert seen.request is not None
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(seen.request)
        while True:  # a byte every 0.1 s: no read ever waits long
            await response.write(b" ")
            await asyncio.sleep(0.1)

    server.answer = trickle
    api = KubeApi(server.credentials, deadline=0.5)
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(Unreachable, match=r"no whole answer within 0\.5 s"):
            await api.get_secret("ns", "creds")
    finally:
        await api.aclose()
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_a_relogin_leaves_requests_in_flight_alone(server: LoopbackApi) -> None:
    slow_started = asyncio.Event()

    async def answer(seen: Seen) -> web.StreamResponse:
        if seen.path.endswith("/slow"):
            slow_started.set()
            await asyncio.sleep(0.3)
            return reply(200, {"data": {}})
        return reply(200 if seen.headers["authorization"] == "Bearer new" else 401)

    server.answer = answer
    tokens = Tokens(server, "old", "new")
    api = KubeApi(tokens)
    try:
        slow = asyncio.create_task(api.get_secret("ns", "slow"))
        await slow_started.wait()
        await api.patch_status(REF, {"phase": "Polling"})  # 401, re-login, sent again
        assert tokens.loads == 2
        assert await slow is not None  # answered on the old connection, not cancelled
    finally:
        await api.aclose()
    assert [s.headers["authorization"] for s in server.seen] == [
        "Bearer old",
        "Bearer old",
        "Bearer new",
    ]
