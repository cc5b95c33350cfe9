"""The one rate limiter: a token bucket on a caller's clock (status writes, Secret reads,
per-host rate caps)."""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """`rate` tokens a second, `burst` at most. `take` takes one that is there (for the
    write chosen at that moment); `book` may take one due soon."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens, self._stamp = float(burst), clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def delay(self) -> float:
        """How long until a token is there; 0 when one is."""
        self._refill()
        return max(0.0, (1 - self._tokens) / self._rate)

    def available(self) -> float:
        """Tokens there now (fractions included)."""
        self._refill()
        return self._tokens

    def take(self) -> None:
        self._refill()
        self._tokens -= 1

    def book(self, max_wait: float) -> float | None:
        """Takes a token that will be there within `max_wait` seconds (on credit, so
        waiting callers are served in order): the seconds until it is; None, and
        nothing taken, when that would be longer."""
        wait = self.delay()
        if wait > max_wait:
            return None
        self._tokens -= 1
        return wait
