"""What one attempt produced: a response, or a failure to get a usable one.

The HTTP client makes these; the policy reads them. Nothing here may hold a
header value from the request: messages end up in status, events and logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

_UNPARSED: Any = object()


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP response (after redirects), body within the size cap."""

    code: int
    headers: Mapping[str, str]  # names lower-case
    text: str  # the body decoded as UTF-8 (undecodable bytes replaced)
    latency_ms: int
    _json: Any = field(default=_UNPARSED, repr=False, compare=False)

    @property
    def body(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON. Parsed once."""
        if self._json is _UNPARSED:
            try:
                value = json.loads(self.text) if self.text else None
            except ValueError:
                value = None
            object.__setattr__(self, "_json", value)
        return self._json


class FailureKind(StrEnum):
    TRANSPORT = "Transport"  # connect, DNS, TLS, timeout: no response at all
    INVALID_RESPONSE = "InvalidResponse"  # body over the cap, too many redirects, ...
    EGRESS_DENIED = "EgressDenied"  # the destination is in a denied address range


@dataclass(frozen=True, slots=True)
class RequestFailure:
    kind: FailureKind
    message: str  # safe to publish: no header values, no URL credentials
    latency_ms: int = 0


Outcome = Response | RequestFailure
