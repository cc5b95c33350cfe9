"""The pinned Go programs the tests drive, shared by the unit and the e2e tests.

Each is built from a module of ours that pins its version (hack/tools/NAME for helm,
promtool and kstatus, hack/controlplane for kubectl) on first use, and cached outside
the checkout (~/.cache/jobwatch/): a cold build takes minutes, a warm one nothing.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "jobwatch"
# Cold builds of the control plane take 10-20 minutes on 2 cores; the tools fewer.
BUILD_TIMEOUT = 1800


def _build(what: str, script: str, *args: str) -> Path:
    """Runs hack/SCRIPT, which builds (or finds cached) and prints a path."""
    built = subprocess.run(
        [str(REPO / "hack" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
    )
    assert built.returncode == 0, f"building {what} failed:\n{built.stderr}"
    return Path(built.stdout.strip())


def build_tool(name: str, package: str | None = None) -> Path:
    """hack/tools/NAME built by hack/build-tool.sh (PACKAGE: its main package, when the
    module only pins one); the binary's path."""
    return _build(name, "build-tool.sh", name, *([package] if package else []))


def pinned_kubectl() -> Path:
    """The kubectl of the pinned control plane (hack/build-controlplane.sh)."""
    return _build("the control plane", "build-controlplane.sh") / "kubectl"


@dataclass(frozen=True)
class Helm:
    """The pinned helm CLI. Its configuration, cache and data live in `home` (never in
    the user's ~/.config/helm); `kubeconfig` is the cluster it installs into."""

    binary: Path
    home: Path
    kubeconfig: Path | None = None

    @classmethod
    def build(cls, home: Path) -> Helm:
        return cls(build_tool("helm", "helm.sh/helm/v4/cmd/helm"), home)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "NO_COLOR": "1",
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return subprocess.run(
            [str(self.binary), *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def template(
        self, *args: str, release: str = "jobwatch", namespace: str = "jobwatch-system"
    ) -> list[dict[str, Any]]:
        """`helm template` of charts/jobwatch, the CRD included; the objects."""
        rendered = self.run(
            "template", release, str(CHART), "--namespace", namespace, "--include-crds", *args
        )
        assert rendered.returncode == 0, rendered.stderr
        return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
