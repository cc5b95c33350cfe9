"""charts/jobwatch with the real helm, and against manifests/: one source of truth.

No cluster: the pinned helm (lint, template, its values.schema.json) and the pinned
kubectl's kustomize. The chart with default values and `kubectl kustomize manifests/`
must render the same objects, field by field, but for the differences listed below
(README.md, "Helm", lists them for users); so must the monitoring and the namespaced
layouts. tests/e2e/test_helm.py installs, upgrades and uninstalls the chart on a real
API server.
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gotools import CHART, REPO, Helm

from jobwatch.app.config import Config, log_settings_from_env

Obj = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace ("" for cluster-scoped), name

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "jobwatch", "jobwatch-system"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY = "app.kubernetes.io/managed-by"
CHART_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

# The allowed differences between the chart (release `jobwatch` in `jobwatch-system`)
# and kustomize; README.md, "Helm" says the same to users. Anything else that differs
# fails test_the_chart_renders_what_kustomize_does.
# 1. Labels the chart puts on every object: Helm's own, with their expected values.
CHART_LABELS = {
    "helm.sh/chart": f"jobwatch-{CHART_VERSION}",
    "app.kubernetes.io/version": APP_VERSION,
    MANAGED_BY: "Helm",
    INSTANCE: RELEASE,
}
# ... where manifests/ says managed-by kustomize (the monitoring component says nothing)
# and the instance on some objects only.
KUSTOMIZE_LABELS = {MANAGED_BY: "kustomize", INSTANCE: RELEASE}
# 2. The chart's selectors also select on the instance, so that two releases in one
# namespace never count, spread or scrape each other's pods: (kind, path to the map).
SELECTORS = [
    ("Deployment", ("spec", "selector", "matchLabels")),
    ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
    ("Service", ("spec", "selector")),
    ("ServiceMonitor", ("spec", "selector", "matchLabels")),
]
# 3. The Namespace is not the chart's: `helm install --namespace` needs it to exist
# (kubectl create namespace + the Pod Security label, README.md).
KUSTOMIZE_ONLY = {("Namespace", "", NAMESPACE)}

# (chart values, kustomize folder): each layout rendered both ways.
LAYOUTS = {
    "default": ((), "manifests"),
    "monitoring": (("--set", "monitoring.enabled=true"), "manifests/overlays/monitoring"),
    "namespaced": (
        ("-f", str(CHART / "ci" / "namespaced-values.yaml")),
        "manifests/overlays/namespaced",
    ),
}

# Values the chart must refuse, and what its error must name: the schema's path
# (values.schema.json) or the template's check (templates/_helpers.tpl, _env.tpl).
BAD_VALUES = {
    "log format": ("logFormat: xml", "/logFormat"),
    "log level": ("logLevel: verbose", "/logLevel"),
    "duration as a number": ("leases: {enabled: true, duration: 15}", "/leases/duration"),
    "duration not in Go form": ("status: {progressInterval: 15 sec}", "/status/progressInterval"),
    "negative duration": ("secrets: {ttl: -5s}", "/secrets/ttl"),
    "status qps below 0.1": ("status: {qps: 0.01}", "/status/qps"),
    "host qps neither 0 nor 0.01+": ("hosts: {qps: 0.001}", "/hosts/qps"),
    "host limit without inFlight": (
        "hosts: {limits: [{host: jobs.example, port: 443, qps: 1}]}",
        "/hosts/limits/0",
    ),
    "replicas as a string": ('replicaCount: "3"', "/replicaCount"),
    "namespace not a DNS label": ("watchNamespaces: [Team_A]", "/watchNamespaces/0"),
    "label value not a string": ("labelSelector: {shard: 2}", "/labelSelector/shard"),
    "unknown key": ("replicas: 3", "'replicas'"),
    "privileged port": ("ports: {health: 80, metrics: 9090}", "/ports/health"),
    "too many buckets": ("leases: {enabled: true, buckets: 300}", "/leases/buckets"),
    "image digest": (
        "image: {repository: jobwatch, tag: dev, pullPolicy: IfNotPresent, digest: abc}",
        "/image/digest",
    ),
    "scrape interval": (
        "monitoring: {serviceMonitor: {interval: 30}}",
        "/monitoring/serviceMonitor/interval",
    ),
    # What the schema cannot express: the operator's own rules (app/config.py).
    "renew deadline above lease duration": (
        "leases: {enabled: true, renewDeadline: 20s}",
        "leases.duration > leases.renewDeadline > 1.2 x leases.retryPeriod",
    ),
    "retry period too close to the renew deadline": (
        "leases: {enabled: true, renewDeadline: 2s, retryPeriod: 2s}",
        "leases.renewDeadline > 1.2 x leases.retryPeriod",
    ),
    "replicas without leases": ("leases: {enabled: false}", "leases.enabled"),
    "breaker cool-down above its maximum": (
        "hosts: {breaker: {cooldown: 10m}}",
        "hosts.breaker.cooldown must be above 0 and at most hosts.breaker.maxCooldown",
    ),
    "shutdown budget beyond the grace period": (
        "shutdownBudget: 15s",
        "shutdownBudget (15s) must be below terminationGracePeriodSeconds (15)",
    ),
    "same port twice": ("ports: {health: 9090, metrics: 9090}", "ports.health and ports.metrics"),
    "extraEnv naming a setting": (
        "extraEnv: [{name: JOBWATCH_LOG_FORMAT, value: json}]",
        "extraEnv: JOBWATCH_LOG_FORMAT has a value of its own",
    ),
}


def key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


def kustomize(kubectl_bin: Path, folder: str) -> list[Obj]:
    built = subprocess.run(
        [str(kubectl_bin), "kustomize", str(REPO / folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def dig(obj: Obj, path: Iterable[str]) -> dict[str, Any]:
    for part in path:
        obj = obj[part]
    return obj


def selector_maps(obj: Obj) -> Iterator[dict[str, Any]]:
    """The label selectors of `obj` to which the chart adds the instance."""
    for kind, path in SELECTORS:
        if obj["kind"] == kind:
            yield dig(obj, path)
    if obj["kind"] == "Deployment":
        for spread in obj["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            yield spread["labelSelector"]["matchLabels"]


def without_allowed_differences(obj: Obj, origin: str) -> Obj:
    """`obj` less the differences the chart is allowed, each checked on the way: what is
    left must be equal on both sides."""
    obj = copy.deepcopy(obj)
    if obj["kind"] == "CustomResourceDefinition":
        return obj  # Helm installs crds/ as it is, never templated
    labels = obj["metadata"].get("labels", {})
    expected = CHART_LABELS if origin == "helm" else KUSTOMIZE_LABELS
    for name, value in expected.items():
        if origin == "helm" or name in labels:
            assert labels.pop(name) == value, (key(obj), name)
    for selector in selector_maps(obj):
        if origin == "helm":
            assert selector.pop(INSTANCE) == RELEASE, key(obj)
        else:
            assert INSTANCE not in selector, key(obj)
    return obj


def differences(chart: Any, kustomized: Any, path: str = "") -> list[str]:
    """Where two objects differ, as `path: chart != kustomize` lines."""
    if isinstance(chart, dict) and isinstance(kustomized, dict):
        return [
            line
            for name in sorted(chart.keys() | kustomized.keys())
            for line in differences(chart.get(name), kustomized.get(name), f"{path}.{name}")
        ]
    if isinstance(chart, list) and isinstance(kustomized, list) and len(chart) == len(kustomized):
        return [
            line
            for i, (a, b) in enumerate(zip(chart, kustomized, strict=True))
            for line in differences(a, b, f"{path}[{i}]")
        ]
    return [] if chart == kustomized else [f"{path}: {chart!r} != {kustomized!r}"]


def render(helm: Helm, values: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "values.yaml"
    path.write_text(values)
    return helm.run("template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(path), *args)


def by_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj["kind"] == kind]


def the_deployment(objs: Iterable[Obj]) -> Obj:
    (deployment,) = by_kind(objs, "Deployment")
    return deployment


def operator_env(deployment: Obj, namespace: str = NAMESPACE) -> dict[str, str]:
    """The operator container's env as the process sees it (the downward API resolved)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    fields = {"metadata.namespace": namespace, "metadata.name": "jobwatch-operator-0"}
    return {
        var["name"]: var["value"]
        if "value" in var
        else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        for var in container["env"]
    }


def test_helm_is_the_pinned_version(helm: Helm) -> None:
    """hack/tools/helm/go.mod pins it; the build stamps that version in (version-var)."""
    go_mod = (REPO / "hack" / "tools" / "helm" / "go.mod").read_text()
    pinned = re.search(r"^require helm\.sh/helm/v4 (v\S+)$", go_mod, re.MULTILINE)
    assert pinned is not None
    assert helm.run("version", "--template", "{{.Version}}").stdout == pinned[1]


def test_the_chart_holds_the_crd_files_of_crds() -> None:
    names = {p.name for p in (REPO / "crds").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert {p.name for p in (CHART / "crds").iterdir()} == names


@pytest.mark.parametrize(
    ("copy_in_chart", "original"),
    [
        ("crds/jobwatch.dev_jobwatches.yaml", "crds/jobwatch.dev_jobwatches.yaml"),
        ("files/jobwatch.json", "integrations/grafana/jobwatch.json"),
        ("files/prometheusrule.yaml", "manifests/components/monitoring/prometheusrule.yaml"),
    ],
)
def test_the_chart_holds_exact_copies(copy_in_chart: str, original: str) -> None:
    """A chart cannot read files outside its folder: these are copies, and must stay so."""
    assert (CHART / copy_in_chart).read_bytes() == (REPO / original).read_bytes(), (
        f"charts/jobwatch/{copy_in_chart} is no longer a copy of {original}: "
        f"cp {original} charts/jobwatch/{copy_in_chart}"
    )


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict(helm: Helm, values: Path) -> None:
    linted = helm.run("lint", "--strict", str(CHART), "-n", NAMESPACE, "-f", str(values))
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in linted.stdout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_chart_renders_what_kustomize_does(helm: Helm, kubectl_bin: Path, layout: str) -> None:
    args, folder = LAYOUTS[layout]
    chart = {key(o): without_allowed_differences(o, "helm") for o in helm.template(*args)}
    kustomized = {
        key(o): without_allowed_differences(o, "kustomize") for o in kustomize(kubectl_bin, folder)
    }
    assert set(kustomized) - set(chart) == KUSTOMIZE_ONLY
    assert set(chart) - set(kustomized) == set()
    assert {"Deployment", "ServiceAccount", "CustomResourceDefinition"} <= {k[0] for k in chart}
    found = {k: differences(chart[k], kustomized[k]) for k in sorted(chart)}
    assert {k: lines for k, lines in found.items() if lines} == {}


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_each_ci_values_file_gives_the_operator_a_configuration_it_accepts(
    helm: Helm, values: Path
) -> None:
    objs = helm.template("-f", str(values))
    env = operator_env(the_deployment(objs))
    log_settings_from_env(env)
    Config.from_env(env)
    for obj in objs:
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"]["labels"][INSTANCE] == RELEASE, key(obj)


def test_every_operator_setting_has_a_value(helm: Helm) -> None:
    """ci/all-settings-values.yaml sets every value: the env then names every variable
    app/config.py reads, and the operator reads each as given there."""
    source = (REPO / "operator" / "jobwatch" / "app" / "config.py").read_text()
    read = set(re.findall(r"\(\s*\"(JOBWATCH_[A-Z_]+)\"", source))
    assert len(read) > 30, read
    objs = helm.template("-f", str(CHART / "ci" / "all-settings-values.yaml"))
    env = operator_env(the_deployment(objs))
    assert set(env) - {"PYTHONFAULTHANDLER"} == read
    config = Config.from_env(env)
    logs = log_settings_from_env(env)
    assert (logs.format.value, logs.level) == ("json", 10)
    assert config.namespaces == ("team-a",)
    assert config.labels == (("jobwatch.dev/shard", "a"), ("tier", "gold"))
    assert (config.max_body_bytes, config.max_in_flight) == (65536, 500)
    assert (config.progress_interval, config.status_qps, config.status_burst) == (90, 30.5, 60)
    assert (config.event_qps, config.event_burst) == (0.5, 10)
    assert (config.secret_ttl, config.secret_qps, config.secret_burst) == (0.5, 5, 8)
    assert (config.health_port, config.metrics_port, config.shutdown_budget) == (8081, 9091, 20)
    assert set(config.hosts.overrides) == {"jobs.example:443", "fd00::1:8080"}
    assert (config.hosts.breaker_failures, config.hosts.cooldown) == (3, 2)
    assert config.hosts.max_cooldown == 60
    assert config.leases is not None
    leases = config.leases
    assert (leases.group, leases.buckets, leases.identity) == ("shard-a", 64, "jobwatch-operator-0")
    assert (leases.lease_duration, leases.renew_deadline, leases.retry_period) == (20, 12, 3)
    assert config.egress.allow is not None


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_value_fails_naming_it(helm: Helm, tmp_path: Path, case: str) -> None:
    values, named = BAD_VALUES[case]
    rendered = render(helm, values, tmp_path)
    assert rendered.returncode != 0, rendered.stdout
    assert named in rendered.stderr, rendered.stderr


def test_a_whole_number_is_written_as_one(helm: Helm, tmp_path: Path) -> None:
    """Helm reads numbers as floats: 1048576 must not reach the operator as 1.048576e+06."""
    rendered = render(helm, "maxBodyBytes: 1048576\nstatus: {qps: 2.5}\n", tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    env = operator_env(the_deployment(yaml.safe_load_all(rendered.stdout)))
    assert (env["JOBWATCH_MAX_BODY_BYTES"], env["JOBWATCH_STATUS_QPS"]) == ("1048576", "2.5")


def test_another_release_name_shares_no_name_with_manifests(helm: Helm, kubectl_bin: Path) -> None:
    kustomized = {key(o)[0::2] for o in kustomize(kubectl_bin, "manifests")}
    for release, prefix in (("team-a", "team-a-jobwatch-"), ("jobwatch-b", "jobwatch-b-")):
        objs = helm.template(release=release)
        names = {key(o)[0::2] for o in objs if o["kind"] != "CustomResourceDefinition"}
        assert names and not names & kustomized
        assert all(name.startswith(prefix) for _, name in names), names


@pytest.mark.parametrize(
    ("release", "group"),
    [
        ("team-a", "team-a-jobwatch"),
        ("jobwatch-b", "jobwatch-b"),
        ("a.b." + "x" * 40, "a-b-" + "x" * 36),
    ],
)
def test_each_release_has_a_lease_group_of_its_own(helm: Helm, release: str, group: str) -> None:
    """Two releases in one namespace must not share Leases: the group is the name prefix
    (release `jobwatch` keeps the operator's default, as in manifests/)."""
    env = operator_env(the_deployment(helm.template(release=release)))
    assert env["JOBWATCH_LEASE_GROUP"] == group
    assert Config.from_env(env).leases is not None  # a group the operator accepts


def test_namespaced_values_grant_nothing_cluster_wide(helm: Helm) -> None:
    objs = helm.template("-f", str(CHART / "ci" / "namespaced-values.yaml"))
    kinds = {obj["kind"] for obj in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    cluster_role = yaml.safe_load((REPO / "manifests" / "rbac" / "role.yaml").read_text())
    roles = {o["metadata"]["namespace"]: o for o in by_kind(objs, "Role")}
    assert set(roles) == {"team-a", "team-b", NAMESPACE}  # the Leases' Role stays
    for namespace in ("team-a", "team-b"):
        assert roles[namespace]["rules"] == cluster_role["rules"]
    bindings = {o["metadata"]["namespace"]: o for o in by_kind(objs, "RoleBinding")}
    assert bindings["team-a"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "jobwatch-operator", "namespace": NAMESPACE}
    ]
    assert operator_env(the_deployment(objs))["JOBWATCH_NAMESPACES"] == "team-a,team-b"


def test_the_namespaced_overlay_lists_the_same_namespaces_twice(kubectl_bin: Path) -> None:
    """Kustomize cannot loop: the overlay names its namespaces in the env list and as one
    folder each, and the two must agree."""
    objs = kustomize(kubectl_bin, "manifests/overlays/namespaced")
    listed = operator_env(the_deployment(objs))["JOBWATCH_NAMESPACES"].split(",")
    granted = {o["metadata"]["namespace"] for o in by_kind(objs, "RoleBinding")} - {NAMESPACE}
    assert sorted(listed) == sorted(granted) == ["team-a", "team-b"]
    assert not {o["kind"] for o in objs} & {"ClusterRole", "ClusterRoleBinding", "ConfigMap"}
    # watched-namespace/role.yaml repeats manifests/rbac/role.yaml's rules: they must agree.
    cluster_role = yaml.safe_load((REPO / "manifests" / "rbac" / "role.yaml").read_text())
    for role in by_kind(objs, "Role"):
        if role["metadata"]["namespace"] != NAMESPACE:
            assert role["rules"] == cluster_role["rules"], role["metadata"]


def test_monitoring_values(helm: Helm) -> None:
    objs = {key(o): o for o in helm.template("-f", str(CHART / "ci" / "monitoring-values.yaml"))}
    monitor = objs[("ServiceMonitor", NAMESPACE, "jobwatch")]
    rule = objs[("PrometheusRule", NAMESPACE, "jobwatch")]
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    dashboard = objs[("ConfigMap", "monitoring", "jobwatch-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "jobwatch"}
    grafana = REPO / "integrations" / "grafana" / "jobwatch.json"
    assert dashboard["data"]["jobwatch.json"] == grafana.read_text()


def test_replicas_values(helm: Helm) -> None:
    objs = helm.template("-f", str(CHART / "ci" / "replicas-values.yaml"))
    deployment = the_deployment(objs)
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"]) == (
        "topology.kubernetes.io/zone",
        "DoNotSchedule",
    )
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    env = operator_env(deployment)
    assert (env["JOBWATCH_BUCKETS"], env["JOBWATCH_LEASE_DURATION"]) == ("64", "30s")
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of values.yaml's settings: the leaves, and maps that are free-form
    (labels, resources) or empty, as one."""
    for name, value in values.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and value and name not in FREE_FORM:
            yield from value_paths(value, f"{path}.")
        else:
            yield path


FREE_FORM = {"resources", "podSecurityContext", "securityContext", "labels"}


def test_every_value_is_in_the_charts_readme() -> None:
    documented = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [path for path in value_paths(values) if f"`{path}`" not in documented]
    assert missing == []
