"""How a Kubernetes API request fails, as the callers see it (layer: kube adapter).

`Unreachable` (no whole answer), `ApiError` (an answer that refuses: its status and
message) and `Expired` (a list or watch from a resourceVersion too old), and how an
answer or a transport error becomes one of them.
"""

from __future__ import annotations

import json


class Unreachable(Exception):
    """No (whole) answer from the API server: not connected, the connection broke, or
    it timed out."""


class Expired(Exception):
    """The resourceVersion to watch from is too old (410 Gone): list again."""


# What kube-apiserver answers (422, reason Invalid, no details) when a JSON patch does not
# apply to the object as stored: one of its `test`s failed (the uid, the status fence),
# or a path it adds to is missing. A refusal by the schema names the object and the
# fields instead. Measured on kube-apiserver 1.35 (tests/e2e/test_status_fence.py).
PATCH_NOT_APPLIED = "the server rejected our request due to an error in our request"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def gone(self) -> bool:
        """The object is gone or was replaced by another with the same name."""
        return self.status in (404, 409)

    @property
    def retriable(self) -> bool:
        """The same request may well succeed a moment later: 429, 5xx, and 403, which a
        restarted API server answers until its authorizer has loaded the RBAC rules (a
        status write refused then would be lost for good, an end included)."""
        return self.status in (403, 429) or self.status >= 500

    @property
    def not_applied(self) -> bool:
        """A JSON patch refused because it does not apply to the object as stored (a
        `test` failed), not because of what it writes."""
        return self.status == 422 and self.message == PATCH_NOT_APPLIED


def api_error(status: int, body: bytes) -> ApiError:
    """The error an answer with this status and body stands for."""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    return ApiError(status, message)


def unreachable(exc: Exception) -> Unreachable:
    # httpx's messages name no header and no token; some are empty.
    return Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def list_failure(error: ApiError) -> Exception:
    """What a failed list or watch raises: 410 Gone means "list again"."""
    return Expired(error) if error.status == 410 else error
