"""The dashboard and the alert rules against a live operator's /metrics.

A query naming a metric that does not exist, or grouping by a label it does not carry,
shows an empty panel or an alert that can never fire, and nothing else tells. So every
selector in integrations/grafana/jobwatch.json and in the PrometheusRule is checked
against what the operator actually serves while it polls a few jobs.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import yaml
from conftest import OperatorFactory
from harness import REPO, Cluster, JobServer, Namespace, Reply, free_port, iter_docs, wait_for
from prometheus_client.parser import text_string_to_metric_families

COMPONENT = REPO / "manifests" / "components" / "monitoring"
DASHBOARD = REPO / "integrations" / "grafana" / "jobwatch.json"
# Series Prometheus makes itself (`up`) and labels it adds to every scraped series.
SYNTHETIC = {"up"}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}

SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# A metric named without braces would escape the selector check above.
BARE = re.compile(r"\b(?:jobwatch|process)_[a-z_]+\b(?!\{)")


def exposed(text: str) -> dict[str, set[str] | None]:
    """Each sample name /metrics declares -> the label names its samples carry (None:
    declared but no sample yet, as a labelled counter before its first increment)."""
    names: dict[str, set[str] | None] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            names.update({name + suffix: None for suffix in suffixes})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names[sample.name] = (names.get(sample.name) or set()) | set(sample.labels)
    return names


def problems(query: str, metrics: dict[str, set[str] | None]) -> list[str]:
    """What in `query` the live metrics do not have."""
    found = [f"{bare} without a {{}} selector" for bare in BARE.findall(query)]
    selectors = SELECTOR.findall(query)
    if not selectors:
        found.append("no metric selector")
    carried: set[str] = set()
    observed = False
    for name, matchers in selectors:
        if name in SYNTHETIC:
            continue
        if name not in metrics:
            found.append(f"{name} is not exposed")
            continue
        labels = metrics[name]
        if labels is None:
            continue
        observed = True
        carried |= labels
        missing = set(MATCHER.findall(matchers)) - TARGET_LABELS - labels
        found += [f"{name} has no label {label}" for label in sorted(missing)]
    if observed:
        for grouping in GROUPING.findall(query):
            wanted = {label.strip() for label in grouping.split(",") if label.strip()}
            found += [
                f"no metric here has label {x}" for x in sorted(wanted - TARGET_LABELS - carried)
            ]
    return found


def queries() -> Iterable[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in board["templating"]["list"]:
        if "definition" in variable:
            yield f"variable {variable['name']}", variable["definition"]
    rule = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            yield f"alert {alert['alert']}", alert["expr"]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_every_query_names_what_the_operator_exposes(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    port = free_port()
    start_operator(JOBWATCH_METRICS_PORT=str(port))
    rules = {"successWhen": 'response.body.status == "COMPLETED"'}
    ns.create("done", {"url": jobs.script("/done", [Reply(200, {"status": "COMPLETED"})]), **rules})
    running = jobs.script("/running", [Reply(200, {"status": "RUNNING"})])
    ns.create("running", {"url": running, "interval": "200ms", **rules})
    failing = jobs.script("/failing", [Reply(503, {"error": "busy"})])
    ns.create("failing", {"url": failing, "interval": "200ms", **rules})
    ns.wait_phase("done", "Succeeded")

    # Polls of each kind and a written status: the labelled series exist from here on.
    wanted = ('reason="SuccessConditionMet"', 'reason="Polling"', 'reason="HTTPError"')

    def ready() -> str | None:
        text = scrape(port)
        polled = all(f"jobwatch_polls_total{{{label}}}" in text for label in wanted)
        return text if polled and 'jobwatch_status_writes_total{result="written"}' in text else None

    metrics = exposed(wait_for(ready, 20, "polls of every kind in /metrics", interval=0.2))
    report = [f"{where}: {p}" for where, query in queries() for p in problems(query, metrics)]
    assert not report, "\n".join(report)


def test_the_component_renders_onto_the_base_and_its_service_is_admitted(
    installed: Cluster, tmp_path: Path
) -> None:
    """The overlay a user writes (kustomization.yaml in the component says how)."""
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "manifests", tmp_path)],
        "components": [os.path.relpath(COMPONENT, tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    built = installed.kubectl("kustomize", str(tmp_path))
    assert built.returncode == 0, built.stderr
    docs = {doc["kind"]: doc for doc in iter_docs(built.stdout)}
    assert {"Service", "ServiceMonitor", "PrometheusRule", "Deployment"} <= docs.keys()
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    applied = installed.kubectl(
        "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(docs["Service"])
    )
    assert applied.returncode == 0, applied.stderr
