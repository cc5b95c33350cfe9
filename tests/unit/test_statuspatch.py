"""The JSON patch a status write sends (core/patch.py): what its bytes hold.

What the API server does with it (the uid and fence tests) is in test_kube.py and,
end to end, in tests/e2e/test_status_fence.py.
"""

from __future__ import annotations

import json

import pytest

from jobwatch.core import patch as statuspatch
from jobwatch.core.patch import EncodedStatus


def test_a_patch_is_plain_ascii_json_whatever_the_strings_hold() -> None:
    # A lone surrogate (from an endpoint's "\ud800" escape) could not be sent as UTF-8.
    body = statuspatch.status_patch("u", {"message": "caf\u00e9 \ud800", "a/b~c": 1})
    assert body.isascii()
    assert json.loads(body)[1]["value"] == {"message": "caf\u00e9 \ud800", "a/b~c": 1}
    texts = {"a/b~c": "1"}
    ops = json.loads(statuspatch.status_patch("u", EncodedStatus({"a/b~c": 1}, texts, ("a/b~c",))))
    assert ops[1]["path"] == "/status/a~1b~0c"  # RFC 6901 escaping


def test_a_status_with_nan_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        statuspatch.status_patch("u", {"result": float("nan")})
