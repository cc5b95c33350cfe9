"""`kubectl explain jobwatch.status` describes every status field, as the API server serves it
(and `jobwatch.spec.ttlSecondsAfterFinished` its meaning)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import yaml
from harness import REPO, Cluster, wait_for

FIELD = re.compile(r"^(?P<indent> *)(?P<name>[A-Za-z][A-Za-z0-9]*)\t<(?P<type>[^>]*)>")


def crd_fields(schema: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted path of every field under `schema`, from the CRD file."""
    for name, child in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        yield path
        yield from crd_fields(child.get("items", child), f"{path}.")


def explained_fields(text: str) -> list[str]:
    """The dotted paths `kubectl explain --recursive` lists under FIELDS."""
    paths: list[str] = []
    stack: list[str] = []
    listing = False
    for line in text.splitlines():
        if line.startswith("FIELDS:"):
            listing = True
            continue
        match = FIELD.match(line) if listing else None
        if match is None:
            continue
        depth = len(match["indent"]) // 2 - 1
        del stack[depth:]
        stack.append(match["name"])
        paths.append(".".join(stack))
    return paths


def description(text: str) -> str:
    """The DESCRIPTION section of `kubectl explain` for one field."""
    section = text.split("DESCRIPTION:", 1)[1].split("\nFIELDS:", 1)[0]
    return " ".join(section.split())


def test_every_status_field_has_a_description(installed: Cluster) -> None:
    def explain() -> subprocess.CompletedProcess[str] | None:
        shown = installed.kubectl("explain", "jobwatch.status", "--recursive")
        return shown if shown.returncode == 0 else None

    # The API server publishes a new CRD's OpenAPI schema a few seconds after it is
    # Established; until then kubectl cannot find the resource.
    recursive = wait_for(explain, 60, "the JobWatch schema in the OpenAPI document", 0.5)
    listed = explained_fields(recursive.stdout)
    crd = yaml.safe_load((REPO / "crds" / "jobwatch.dev_jobwatches.yaml").read_text())
    [version] = crd["spec"]["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    # What kubectl lists is what the CRD declares: the parse above missed nothing.
    assert sorted(listed) == sorted(crd_fields(status))

    missing = []
    for path in ["", *listed]:
        shown = installed.kubectl("explain", f"jobwatch.status{'.' if path else ''}{path}")
        assert shown.returncode == 0, shown.stderr
        text = description(shown.stdout)
        if not text or text == "<empty>":
            missing.append(path or "status")
        if path == "lastError.class":
            assert "Internal (" in text, text
    assert not missing, f"fields without a description: {missing}"


def test_the_ttl_is_explained(installed: Cluster) -> None:
    def explain() -> subprocess.CompletedProcess[str] | None:
        shown = installed.kubectl("explain", "jobwatch.spec.ttlSecondsAfterFinished")
        return shown if shown.returncode == 0 else None

    shown = wait_for(explain, 60, "the JobWatch schema in the OpenAPI document", 0.5)
    assert "<integer>" in shown.stdout, shown.stdout
    text = description(shown.stdout)
    for says in ("completionTime", "does not start a new watch", "uid", "Argo CD"):
        assert says in text, text
