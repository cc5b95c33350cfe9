"""Secret reads for headers and CA bundles, within the operator's API budget.

Every attempt of a watch needs its Secrets, and a thousand watches polling every 5 s
with a Secret header would be 200 GETs a second: the API server answers 429 and every
tenant's reads fail. So reads go through `SecretCache`:

- each (namespace, name) is read at most once per TTL; a missing Secret too, for less;
- concurrent callers of one key share one read in flight;
- a fleet-wide token bucket caps the GETs a second, and a caller waits for a token a
  bounded time at most;
- size is bounded (LRU).

Whatever keeps a Secret from being read (API error, timeout, no budget left) raises
`SecretUnavailable`, whose message names the Secret and never carries its data or the
API server's own message. While reads fail, a value read shortly before is served
instead (`stale_for`), so one tenant exhausting the budget does not blind the watches
whose Secrets were already known.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from jobwatch.kits.ratelimit import TokenBucket
from jobwatch.kits.ttlcache import TtlCache
from jobwatch.kube.api import Secret
from jobwatch.kube.errors import ApiError, Unreachable

log = logging.getLogger(__name__)

Key = tuple[str, str]


class SecretReader(Protocol):
    async def get_secret(self, namespace: str, name: str) -> Secret | None: ...


class SecretUnavailable(Exception):
    """A Secret could not be read now; safe to publish (names the Secret only)."""


def _seconds(value: float) -> str:
    return f"{value:g}s"


class SecretCache:
    """Reads Secrets through `api` with a TTL, one read per key in flight, an LRU
    bound and a read budget. Use it inside one running event loop."""

    def __init__(
        self,
        api: SecretReader,
        *,
        ttl: float = 10.0,
        missing_ttl: float = 5.0,
        stale_for: float = 120.0,
        max_entries: int = 10_000,
        reads_per_second: float = 20.0,
        burst: int = 40,
        max_wait: float = 1.0,
        read_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._api = api
        self._ttl, self._missing_ttl, self._stale_for = ttl, missing_ttl, stale_for
        self._max_wait, self._read_timeout = max_wait, read_timeout
        self._clock, self._sleep = clock, sleep
        self._budget = TokenBucket(reads_per_second, burst, clock)
        self._entries: TtlCache[Key, Secret | None] = TtlCache(max_entries, clock)

    async def get(self, namespace: str, name: str) -> Secret | None:
        """The Secret, or None when it does not exist or may not be read (403/404).

        Raises SecretUnavailable when it cannot be read now.
        """
        key = (namespace, name)
        fresh = self._entries.fresh(key)
        if fresh is not None:
            return fresh.value
        try:
            return await self._entries.load(key, functools.partial(self._read, key))
        except SecretUnavailable:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.stored <= self._stale_for:
                return entry.value
            raise

    async def _read(self, key: Key) -> Secret | None:
        namespace, name = key
        wait = self._budget.book(self._max_wait)
        if wait is None:
            raise self._unavailable(key, "the operator's Secret read budget is used up")
        if wait:
            await self._sleep(wait)
        try:
            async with asyncio.timeout(self._read_timeout):
                secret = await self._api.get_secret(namespace, name)
        except TimeoutError:
            raise self._unavailable(
                key, f"the API server did not answer within {_seconds(self._read_timeout)}"
            ) from None
        except ApiError as exc:
            raise self._unavailable(key, f"the API server answered HTTP {exc.status}") from None
        except Unreachable as exc:
            # What went wrong underneath (refused, reset, timed out), by its type only:
            # its text names the API server's address.
            why = f"the API server could not be reached ({type(exc.__cause__ or exc).__name__})"
            raise self._unavailable(key, why) from None
        except Exception as exc:
            # A body that is not a Secret (bad JSON or base64), for one. The exception's
            # own text is not used: it could quote the body.
            why = f"the API server's answer could not be used ({type(exc).__name__})"
            raise self._unavailable(key, why) from None
        # A refusal is checked again as soon as a missing Secret: RBAC may be fixed.
        ttl = self._ttl if secret is not None and secret.readable else self._missing_ttl
        self._entries.put(key, secret, ttl)
        return secret

    @staticmethod
    def _unavailable(key: Key, why: str) -> SecretUnavailable:
        namespace, name = key
        message = f"Secret {name!r} in namespace {namespace} could not be read: {why}"
        log.debug("%s", message)
        return SecretUnavailable(message)
