"""Operator configuration from the environment: defaults, and errors naming the variable."""

from __future__ import annotations

import ipaddress

import pytest

from jobwatch.config import Config, ConfigError


def test_defaults() -> None:
    config = Config.from_env({})
    assert config.namespaces == ()
    assert config.labels == ()
    assert config.max_body_bytes == 1024 * 1024
    assert config.progress_interval == 15.0
    assert config.status_qps == 18.0
    assert config.shutdown_budget == 10.0
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
        }
    )
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
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: value})
    assert variable in str(caught.value)
