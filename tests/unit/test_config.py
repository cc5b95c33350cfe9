"""Operator configuration from the environment: defaults, and errors naming the variable."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobwatch.app.config import Config, ConfigError


def test_defaults() -> None:
    config = Config.from_env({})
    assert config.namespaces == ()
    assert config.labels == ()
    assert config.max_body_bytes == 1024 * 1024
    assert config.progress_interval == 15.0
    assert config.status_qps == 18.0
    assert config.shutdown_budget == 10.0
    assert (config.delete_qps, config.delete_burst) == (10.0, 20)
    assert config.egress.check(ipaddress.ip_address("169.254.169.254")) is not None
    assert config.egress.check(ipaddress.ip_address("127.0.0.1")) is None


def test_values_are_read() -> None:
    config = Config.from_env(
        {
            "JOBWATCH_NAMESPACES": "a, b",
            "JOBWATCH_LABEL_SELECTOR": "jobwatch.dev/shard=1,team=x",
            "JOBWATCH_EGRESS_DENY": "127.0.0.0/8",
            "JOBWATCH_STATUS_PROGRESS_INTERVAL": "500ms",
            "JOBWATCH_MAX_IN_FLIGHT": "50",
            "JOBWATCH_DELETE_QPS": "2.5",
            "JOBWATCH_DELETE_BURST": "5",
        }
    )
    assert (config.delete_qps, config.delete_burst) == (2.5, 5)
    assert config.namespaces == ("a", "b")
    assert config.labels == (("jobwatch.dev/shard", "1"), ("team", "x"))
    assert config.egress.check(ipaddress.ip_address("127.0.0.1")) is not None
    assert config.progress_interval == 0.5
    assert config.max_in_flight == 50


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOBWATCH_MAX_IN_FLIGHT", "many"),
        ("JOBWATCH_MAX_IN_FLIGHT", "0"),
        ("JOBWATCH_STATUS_PROGRESS_INTERVAL", "15"),
        ("JOBWATCH_EGRESS_DENY", "10.0.0.1/8"),
        ("JOBWATCH_LABEL_SELECTOR", "shard"),
        ("JOBWATCH_DELETE_QPS", "0"),
        ("JOBWATCH_DELETE_QPS", "inf"),
        ("JOBWATCH_DELETE_BURST", "0"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "port"),
    [
        ("JOBWATCH_HEALTH_PORT", "0", 0),
        ("JOBWATCH_METRICS_PORT", "0", 0),
        ("JOBWATCH_HEALTH_PORT", " 8081 ", 8081),
        ("JOBWATCH_METRICS_PORT", "65535", 65535),
    ],
)
def test_ports_are_read(variable: str, value: str, port: int) -> None:
    config = Config.from_env({variable: value})
    assert getattr(config, variable.removeprefix("JOBWATCH_").lower()) == port


def test_default_ports() -> None:
    config = Config.from_env({})
    assert (config.health_port, config.metrics_port) == (8080, 9090)


@pytest.mark.parametrize("variable", ["JOBWATCH_HEALTH_PORT", "JOBWATCH_METRICS_PORT"])
@pytest.mark.parametrize("value", ["", "-1", "+80", "80.9", "8e1", "0x50", "٨٠", "65536", "http"])
def test_a_port_is_plain_digits_in_range(variable: str, value: str) -> None:
    # Each of these would have been read as some port by int() or float(), or as
    # kopf's default port 80: the operator must listen on no port nobody named.
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert variable in str(caught.value)
    assert "0 for no endpoint" in str(caught.value)


def test_health_and_metrics_cannot_share_a_port() -> None:
    with pytest.raises(ConfigError, match="both 8000"):
        Config.from_env({"JOBWATCH_HEALTH_PORT": "8000", "JOBWATCH_METRICS_PORT": "8000"})
    both_off = Config.from_env({"JOBWATCH_HEALTH_PORT": "0", "JOBWATCH_METRICS_PORT": "0"})
    assert (both_off.health_port, both_off.metrics_port) == (0, 0)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on (on loopback: enough to refuse 0.0.0.0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# `python -m jobwatch` and the console script pyproject declares start the same process.
COMMANDS = {
    "python -m jobwatch": [sys.executable, "-m", "jobwatch"],
    "jobwatch-operator": [str(Path(sys.executable).with_name("jobwatch-operator"))],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
@pytest.mark.parametrize("variable", ["JOBWATCH_HEALTH_PORT", "JOBWATCH_METRICS_PORT"])
def test_a_taken_port_stops_the_operator_at_once_with_one_line(
    variable: str, taken_port: int, command: list[str]
) -> None:
    # No cluster is needed: the ports are bound before kopf starts, so the process
    # exits before it would even look for credentials; a line of kopf's in stderr
    # (logging goes there) would mean it got further.
    env = {
        **os.environ,
        "JOBWATCH_HEALTH_PORT": "0",
        "JOBWATCH_METRICS_PORT": "0",
        variable: str(taken_port),
        "KUBECONFIG": "/nonexistent",
    }
    ran = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert ran.stderr == (
        f"jobwatch: {variable}={taken_port}: cannot listen on 0.0.0.0:{taken_port}:"
        " address already in use (set another port, or 0 for no endpoint)\n"
    )


def test_one_replica_unless_a_lease_namespace_is_named() -> None:
    assert Config.from_env({}).leases is None
    leases = Config.from_env(
        {"JOBWATCH_LEASE_NAMESPACE": "jobwatch-system", "JOBWATCH_IDENTITY": "pod-a"}
    ).leases
    assert leases is not None
    assert (leases.namespace, leases.identity, leases.group, leases.buckets) == (
        "jobwatch-system",
        "pod-a",
        "jobwatch",
        32,
    )
    assert (leases.lease_duration, leases.renew_deadline, leases.retry_period) == (15, 10, 2)
    # Without an identity each process gets its own.
    a, b = (Config.from_env({"JOBWATCH_LEASE_NAMESPACE": "ns"}).leases for _ in "ab")
    assert a is not None and b is not None and a.identity != b.identity


def test_the_identity_in_status_is_the_lease_identity() -> None:
    with_leases = Config.from_env({"JOBWATCH_LEASE_NAMESPACE": "ns"})
    assert with_leases.leases is not None
    assert with_leases.identity == with_leases.leases.identity
    assert Config.from_env({"JOBWATCH_IDENTITY": "pod-a"}).identity == "pod-a"
    # One replica without leases still says who wrote its status, and each process differs.
    a, b = (Config.from_env({}).identity for _ in "ab")
    assert a.startswith(socket.gethostname()) and a != b
    with pytest.raises(ConfigError, match="JOBWATCH_IDENTITY"):
        Config.from_env({"JOBWATCH_IDENTITY": "x" * 254})  # status.holder could not take it


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"JOBWATCH_LEASE_DURATION": "10s"}, "JOBWATCH_LEASE_DURATION"),
        ({"JOBWATCH_LEASE_RETRY_PERIOD": "9s"}, "JOBWATCH_LEASE_RETRY_PERIOD"),
        ({"JOBWATCH_BUCKETS": "1000"}, "JOBWATCH_BUCKETS"),
        ({"JOBWATCH_BUCKETS": "0"}, "JOBWATCH_BUCKETS"),
        ({"JOBWATCH_LEASE_GROUP": "Not_A_Label"}, "JOBWATCH_LEASE_GROUP"),
    ],
)
def test_lease_settings_that_cannot_work_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Config.from_env({"JOBWATCH_LEASE_NAMESPACE": "ns", **env})
