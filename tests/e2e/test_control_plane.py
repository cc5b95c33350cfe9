"""The test cluster itself: a real API server with the CRD installed and RBAC enforced."""

from __future__ import annotations

from pathlib import Path

from harness import Cluster, Namespace
from kubernetes import client as k8s


def test_api_server_is_ready_and_reports_a_real_version(installed: Cluster) -> None:
    ready = installed.kubectl("get", "--raw", "/readyz")
    assert ready.returncode == 0 and ready.stdout.strip() == "ok"
    version = installed.kubectl("version", "-o", "json")
    assert '"gitVersion": "v1.' in version.stdout, version.stdout


def test_crd_is_applied_and_established(installed: Cluster) -> None:
    crd = k8s.ApiextensionsV1Api(installed.api).read_custom_resource_definition(
        "jobwatches.jobwatch.dev"
    )
    established = {c.type: c.status for c in crd.status.conditions}
    assert established.get("Established") == "True"
    assert crd.spec.names.short_names == ["jw"]
    assert crd.spec.versions[0].subresources.status is not None


def test_token_of_serviceaccount_without_roles_is_refused(ns: Namespace, tmp_path: Path) -> None:
    ns.cluster.core.create_namespaced_service_account(
        ns.name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    kubeconfig = ns.cluster.service_account_kubeconfig(
        ns.name, "nobody", tmp_path / "nobody.kubeconfig"
    )
    # Authenticated (the token is valid) ...
    who = ns.cluster.kubectl("auth", "whoami", "-o", "name", kubeconfig=kubeconfig)
    assert who.returncode == 0, who.stderr
    # ... but authorized for nothing.
    listed = ns.cluster.kubectl("get", "jobwatches", "-n", ns.name, kubeconfig=kubeconfig)
    assert listed.returncode != 0
    assert "forbidden" in listed.stderr.lower()
    assert f"system:serviceaccount:{ns.name}:nobody" in listed.stderr
