"""Fixtures shared by the unit tests of the API client and the informer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from loopback_api import LoopbackApi

from jobwatch.kube.api import KubeApi


@pytest.fixture
async def server() -> AsyncIterator[LoopbackApi]:
    """A loopback stand-in for the API server (loopback_api.py)."""
    async with LoopbackApi() as server:
        yield server


@pytest.fixture
async def api(server: LoopbackApi) -> AsyncIterator[KubeApi]:
    """The operator's API client, logged in to `server`."""
    client = KubeApi(server.credentials)
    yield client
    await client.aclose()
