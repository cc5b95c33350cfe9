"""The monitoring component and the Grafana dashboard, checked without a cluster.

The alert rules go through the real promtool (`check rules`, then `test rules` with the
unit tests in manifests/components/monitoring/tests/), built from a pinned Prometheus
module like the control plane (hack/tools/promtool). That every metric the rules and
the dashboard name is one a live operator exposes is tests/e2e/test_monitoring_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from gotools import build_tool

REPO = Path(__file__).resolve().parents[2]
COMPONENT = REPO / "manifests" / "components" / "monitoring"
DASHBOARD = REPO / "integrations" / "grafana" / "jobwatch.json"
SOURCE = REPO / "operator" / "jobwatch"


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def alert_rules() -> list[dict[str, Any]]:
    spec = load(COMPONENT / "prometheusrule.yaml")["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in sorted((COMPONENT / "tests").glob("*.yaml"))
        for group in load(path)["tests"]
        for case in group["alert_rule_test"]
    ]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return queries + [v["definition"] for v in board["templating"]["list"] if "definition" in v]


@pytest.fixture(scope="module")
def promtool() -> Path:
    """promtool, built on first use (a cold build takes minutes) and cached."""
    return build_tool("promtool", "github.com/prometheus/prometheus/cmd/promtool")


@pytest.fixture
def rule_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's `spec` as a plain rule file, next to the rule unit tests."""
    spec = load(COMPONENT / "prometheusrule.yaml")["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": spec["groups"]}))
    for path in (COMPONENT / "tests").glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def run(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_pass_promtool_check(promtool: Path, rule_dir: Path) -> None:
    checked = run(
        promtool, "check", "rules", "--lint=all", "--lint-fatal", "rules.yaml", cwd=rule_dir
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alerts_pass_their_unit_tests(promtool: Path, rule_dir: Path) -> None:
    tests = sorted(p.name for p in rule_dir.glob("*.yaml") if p.name != "rules.yaml")
    assert tests
    tested = run(promtool, "test", "rules", *tests, cwd=rule_dir)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    cases = rule_tests()
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == names, "each alert needs a test where it fires"
    assert quiet == names, "each alert needs a test where it stays quiet"


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        # The ServiceMonitor's jobLabel makes job="jobwatch": other exporters' series of
        # the same name must never match.
        for selector in re.findall(r"\b[a-z_]+\{[^}]*\}", rule["expr"]):
            assert 'job="jobwatch"' in selector, (rule["alert"], selector)


def test_metrics_service_reaches_the_operator_pods() -> None:
    """Service -> Deployment pods and port; ServiceMonitor -> Service and port; `job`."""
    deployment = load(REPO / "manifests" / "manager" / "deployment.yaml")
    pod = deployment["spec"]["template"]
    service = load(COMPONENT / "service.yaml")
    monitor = load(COMPONENT / "servicemonitor.yaml")
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    container_ports = {
        p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]
    }
    assert container_ports[port["targetPort"]] == 9090
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "jobwatch"
    component = load(COMPONENT / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert all((COMPONENT / name).is_file() for name in component["resources"])


def test_dashboard_is_valid_grafana_json() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            # every selector is scoped by the variables, so one dashboard serves shards
            for selector in re.findall(r"\b[a-z_]+\{[^}]*\}", t["expr"]):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, selector


def test_reasons_named_in_queries_are_ones_the_operator_gives() -> None:
    """A misspelt reason in a `reason=~` matcher matches nothing, silently."""
    given = set(
        re.findall(r'"([A-Z][A-Za-z]+)"', "".join(p.read_text() for p in SOURCE.rglob("*.py")))
    )
    exprs = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    named = {
        reason
        for expr in exprs
        for pattern in re.findall(r'reason\s*[!=]~?\s*"([^"]*)"', expr)
        for reason in pattern.split("|")
    }
    assert named, "the dashboard groups polls by reason"
    assert named <= given, named - given
