"""Fixtures of both the unit and the e2e tests: the pinned helm and kubectl."""

from __future__ import annotations

from pathlib import Path

import pytest
from gotools import Helm, pinned_kubectl


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm, built on first use (a cold build takes about 3 minutes) and cached."""
    return Helm.build(tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    """The pinned kubectl (its kustomize renders manifests/), built on first use."""
    return pinned_kubectl()
