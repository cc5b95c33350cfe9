"""The API client on the real API server: however many namespaces are watched, their
watch streams never hold back a status write (issue #19).

Each watched namespace keeps a watch stream open for minutes. When streams and ordinary
requests shared one limit of 16 connections, an operator watching 24 namespaces wrote no
status at all for a JobWatch in the last of them for over 40 s; with 4 namespaces it
ended in about 4 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from harness import JobServer, Namespace, Operator, Reply
from kubernetes import client as k8s

pytestmark = pytest.mark.e2e

NAMESPACES = 24


@pytest.fixture
def many(ns: Namespace) -> Iterator[list[Namespace]]:
    """NAMESPACES - 1 namespaces more than the test's own, deleted afterwards."""
    made = [Namespace(ns.cluster, f"{ns.name}-{n}") for n in range(1, NAMESPACES)]
    for other in made:
        ns.cluster.core.create_namespace(
            k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=other.name))
        )
    yield made
    for other in made:
        ns.cluster.core.delete_namespace(other.name, propagation_policy="Background")


def test_many_watched_namespaces_do_not_delay_status_writes(
    ns: Namespace,
    many: list[Namespace],
    jobs: JobServer,
    start_operator: Callable[..., Operator],
) -> None:
    start_operator(JOBWATCH_NAMESPACES=",".join([ns.name] + [other.name for other in many]))
    last = many[-1]
    url = jobs.script("/job", [Reply(200, {"status": "RUNNING"}), Reply(200, {"status": "DONE"})])
    created = time.monotonic()
    last.create(
        "w", {"url": url, "interval": "1s", "successWhen": 'response.body.status == "DONE"'}
    )
    last.wait_phase("w", "Succeeded", timeout=20)
    took = time.monotonic() - created
    print(f"\n{NAMESPACES} namespaces watched: Succeeded {took:.1f} s after creation")
    # The operator's start-up (listing every namespace) is part of it: a few seconds.
    assert took < 15
