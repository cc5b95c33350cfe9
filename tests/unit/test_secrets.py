"""SecretCache against a fake API that counts its GETs; time is a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from jobwatch.kube.api import FORBIDDEN_SECRET, Secret
from jobwatch.kube.errors import ApiError, Unreachable
from jobwatch.kube.secrets import SecretCache, SecretUnavailable

TOKEN = Secret(labels={"jobwatch.dev/allow-use": "true"}, data={"token": b"s3cr3t-value"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # Let every other ready task run at the current time first, as concurrent
        # sleepers would.
        until = self.now + seconds
        self.slept.append(seconds)
        await asyncio.sleep(0)
        self.now = max(self.now, until)


class FakeApi:
    """Answers from `secrets`; an exception there is raised instead. While `gate` is
    clear, GETs wait for it."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], Secret | BaseException | None] = {}
        self.gets: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_secret(self, namespace: str, name: str) -> Secret | None:
        self.gets.append((namespace, name))
        await self.gate.wait()
        answer = self.secrets.get((namespace, name))
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    fake.secrets[("ns", "token")] = TOKEN
    return fake


def cache(api: FakeApi, clock: FakeClock, **kwargs: float) -> SecretCache:
    return SecretCache(api, clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


async def test_concurrent_gets_of_one_secret_share_one_read(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock)
    api.gate.clear()
    callers = [asyncio.create_task(secrets.get("ns", "token")) for _ in range(1000)]
    await asyncio.sleep(0)
    api.gate.set()
    results = await asyncio.gather(*callers)
    assert api.gets == [("ns", "token")]
    assert all(result is TOKEN for result in results)


async def test_a_value_is_read_again_once_its_ttl_is_over(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock, ttl=10.0)
    assert await secrets.get("ns", "token") is TOKEN
    clock.now += 9.9
    assert await secrets.get("ns", "token") is TOKEN
    assert len(api.gets) == 1
    rotated = Secret(labels=TOKEN.labels, data={"token": b"rotated"})
    api.secrets[("ns", "token")] = rotated
    clock.now += 0.2
    assert await secrets.get("ns", "token") is rotated
    assert len(api.gets) == 2


async def test_a_missing_secret_is_remembered_for_less_long(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock, ttl=10.0, missing_ttl=2.0)
    assert await secrets.get("ns", "absent") is None
    clock.now += 1.9
    assert await secrets.get("ns", "absent") is None
    assert len(api.gets) == 1
    api.secrets[("ns", "absent")] = TOKEN
    clock.now += 0.2
    assert await secrets.get("ns", "absent") is TOKEN
    assert len(api.gets) == 2


async def test_a_refused_read_is_asked_again_as_soon_as_a_missing_one(
    api: FakeApi, clock: FakeClock
) -> None:
    # The refusal (403) is the operator's RBAC, which an admin may fix at any moment.
    secrets = cache(api, clock, ttl=10.0, missing_ttl=2.0)
    api.secrets[("ns", "token")] = FORBIDDEN_SECRET
    assert await secrets.get("ns", "token") is FORBIDDEN_SECRET
    api.secrets[("ns", "token")] = TOKEN
    clock.now += 2.1
    assert await secrets.get("ns", "token") is TOKEN
    assert len(api.gets) == 2


def unreachable() -> Unreachable:
    """As the API client raises it: its text names the API server."""
    try:
        raise Unreachable("ConnectionRefusedError: 10.96.0.1:443") from ConnectionRefusedError()
    except Unreachable as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (ApiError(500, "etcd is sad: s3cr3t-value"), "the API server answered HTTP 500"),
        (ApiError(429, "slow down"), "the API server answered HTTP 429"),
        (unreachable(), "the API server could not be reached (ConnectionRefusedError)"),
        (ValueError("bad base64: s3cr3t-value"), "the API server's answer could not be used"),
    ],
)
async def test_errors_are_unavailable_and_not_cached(
    api: FakeApi, clock: FakeClock, error: Exception, why: str
) -> None:
    secrets = cache(api, clock)
    api.secrets[("ns", "token")] = error
    with pytest.raises(SecretUnavailable) as info:
        await secrets.get("ns", "token")
    message = str(info.value)
    assert message.startswith("Secret 'token' in namespace ns could not be read: " + why)
    assert "s3cr3t" not in message
    assert "slow down" not in message
    assert "10.96.0.1" not in message

    api.secrets[("ns", "token")] = TOKEN
    assert await secrets.get("ns", "token") is TOKEN
    assert len(api.gets) == 2


async def test_a_read_that_hangs_is_unavailable_after_the_read_timeout(
    api: FakeApi, clock: FakeClock
) -> None:
    secrets = cache(api, clock, read_timeout=0.05)
    api.gate.clear()
    with pytest.raises(SecretUnavailable, match=r"did not answer within 0\.05s"):
        await asyncio.wait_for(secrets.get("ns", "token"), 5)


async def test_reads_beyond_the_budget_wait_a_bounded_time_then_fail(
    api: FakeApi, clock: FakeClock
) -> None:
    secrets = cache(api, clock, reads_per_second=2.0, burst=2, max_wait=1.0)
    names = [f"s{i}" for i in range(10)]
    outcomes = await asyncio.gather(
        *(secrets.get("ns", name) for name in names), return_exceptions=True
    )
    # Two from the burst, two more booked within the one second a caller may wait.
    assert len(api.gets) == 4
    assert max(clock.slept) <= 1.0
    refused = [o for o in outcomes if isinstance(o, SecretUnavailable)]
    assert len(refused) == 6
    assert "Secret read budget is used up" in str(refused[0])
    # Refused callers booked nothing: the budget refills at its rate.
    clock.now += 0.5
    assert await secrets.get("ns", "s9") is None
    assert len(api.gets) == 5


async def test_a_recent_value_is_served_while_reads_fail(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock, ttl=10.0, stale_for=60.0)
    assert await secrets.get("ns", "token") is TOKEN
    api.secrets[("ns", "token")] = ApiError(503, "unavailable")
    clock.now += 30
    assert await secrets.get("ns", "token") is TOKEN
    clock.now += 31
    with pytest.raises(SecretUnavailable, match="HTTP 503"):
        await secrets.get("ns", "token")


async def test_size_is_bounded_least_recently_used_first(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock, max_entries=2)
    await secrets.get("ns", "a")
    await secrets.get("ns", "b")
    await secrets.get("ns", "a")  # a is now the most recently used
    await secrets.get("ns", "c")  # evicts b
    assert len(api.gets) == 3
    await secrets.get("ns", "a")
    assert len(api.gets) == 3
    await secrets.get("ns", "b")
    assert api.gets[-1] == ("ns", "b")
    assert len(api.gets) == 4


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_read(
    api: FakeApi, clock: FakeClock
) -> None:
    secrets = cache(api, clock)
    api.gate.clear()
    quitter = asyncio.create_task(secrets.get("ns", "token"))
    stayer = asyncio.create_task(secrets.get("ns", "token"))
    await asyncio.sleep(0)
    quitter.cancel()
    api.gate.set()
    assert await asyncio.wait_for(stayer, 5) is TOKEN
    assert quitter.cancelled()
    assert len(api.gets) == 1


async def test_keys_are_per_namespace(api: FakeApi, clock: FakeClock) -> None:
    secrets = cache(api, clock)
    assert await secrets.get("ns", "token") is TOKEN
    assert await secrets.get("other", "token") is None
    assert api.gets == [("ns", "token"), ("other", "token")]
