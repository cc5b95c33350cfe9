"""Operator configuration, read once from the environment at start-up.

A bad value stops the operator at start with a message naming the variable:
better than polling with a configuration nobody asked for.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobwatch.control.sharding.leases import LeaseSettings
from jobwatch.core.durations import parse_duration
from jobwatch.jobservice.egress import EgressPolicy, parse_networks
from jobwatch.jobservice.hosts import HostSettings, adaptive, parse_limits
from jobwatch.kits.logs import LogFormat, LogSettings

# Each bucket is a Lease renewed every retry period by its holder: API writes grow with it.
MAX_BUCKETS = 256
# status.holder's maxLength in the CRD.
MAX_IDENTITY = 253
# A per-host rate cap below this is a typo, not a quota (one request every 100 s).
MIN_HOST_QPS = 0.01
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ConfigError(ValueError):
    pass


def process_identity() -> str:
    """This process among the operator's replicas: the pod's name and a random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def log_settings_from_env(env: Mapping[str, str] = os.environ) -> LogSettings:
    """How the operator logs: read on its own, before `Config`, so that an error in
    the rest of the configuration is already logged in the chosen format."""
    raw_format = env.get("JOBWATCH_LOG_FORMAT", "text").strip()
    try:
        log_format = LogFormat(raw_format.lower())
    except ValueError:
        choices = ", ".join(LogFormat)
        raise ConfigError(f"JOBWATCH_LOG_FORMAT={raw_format!r} is not one of {choices}") from None
    raw_level = env.get("JOBWATCH_LOG_LEVEL", "INFO").strip()
    # Any name `logging` knows, as before this was checked (WARN and FATAL too).
    level = logging.getLevelNamesMapping().get(raw_level.upper())
    if level is None:
        raise ConfigError(
            f"JOBWATCH_LOG_LEVEL={raw_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    return LogSettings(format=log_format, level=level)


@dataclass(frozen=True, slots=True)
class Config:
    namespaces: tuple[str, ...]  # empty: the whole cluster
    labels: tuple[tuple[str, str], ...]  # only JobWatches with all these labels (a shard)
    egress: EgressPolicy
    max_body_bytes: int
    max_in_flight: int
    progress_interval: float  # seconds between progress writes of one pending watch
    status_qps: float  # fleet-wide status writes per second, sustained
    status_burst: int
    event_qps: float  # Events per second, sustained, apart from status writes
    event_burst: int
    health_port: int  # 0: no liveness endpoint
    metrics_port: int  # 0: no metrics endpoint
    shutdown_budget: float  # seconds from SIGTERM to exit
    secret_ttl: float  # seconds a Secret read is reused
    secret_qps: float  # fleet-wide Secret reads per second, sustained
    secret_burst: int
    # Deletions after spec.ttlSecondsAfterFinished per second, sustained, and their burst.
    delete_qps: float = 10.0
    delete_burst: int = 20
    hosts: HostSettings = field(default_factory=HostSettings)  # limits and breaker per host
    # Replicas sharing the fleet through Leases; None: one replica polls everything.
    leases: LeaseSettings | None = None
    # This replica, in every status it writes (`status.holder`); the Lease holder identity
    # when leases are on.
    identity: str = field(default_factory=process_identity)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        read = _Env(env)
        egress = _egress(read)
        labels = _labels(read)
        health_port = read.port("JOBWATCH_HEALTH_PORT", "8080")
        metrics_port = read.port("JOBWATCH_METRICS_PORT", "9090")
        if health_port and health_port == metrics_port:
            raise ConfigError(
                f"JOBWATCH_HEALTH_PORT and JOBWATCH_METRICS_PORT are both {health_port}"
            )
        hosts = _hosts(read)
        namespaces = tuple(
            part.strip() for part in read.text("JOBWATCH_NAMESPACES", "").split(",") if part.strip()
        )
        # What decides which replica owns a JobWatch besides the bucket count: replicas
        # of one lease group must agree on it (the sharding Elector refuses a mismatch).
        scope = (
            ("JOBWATCH_NAMESPACES", ",".join(sorted(namespaces)) or "*"),
            ("JOBWATCH_LABEL_SELECTOR", ",".join(f"{k}={v}" for k, v in sorted(labels))),
        )
        identity = read.text("JOBWATCH_IDENTITY", "") or process_identity()
        if len(identity) > MAX_IDENTITY:  # status.holder would refuse every status write
            raise ConfigError(f"JOBWATCH_IDENTITY is longer than {MAX_IDENTITY} characters")
        return cls(
            hosts=hosts,
            leases=_leases(read, identity, scope),
            identity=identity,
            labels=labels,
            namespaces=namespaces,
            egress=egress,
            max_body_bytes=int(read.number("JOBWATCH_MAX_BODY_BYTES", "1048576", 1024)),
            max_in_flight=_max_in_flight(read),
            progress_interval=read.duration("JOBWATCH_STATUS_PROGRESS_INTERVAL", "15s"),
            status_qps=read.number("JOBWATCH_STATUS_QPS", "18", 0.1),
            status_burst=int(read.number("JOBWATCH_STATUS_BURST", "50", 1)),
            event_qps=read.number("JOBWATCH_EVENT_QPS", "2", 0.1),
            event_burst=int(read.number("JOBWATCH_EVENT_BURST", "25", 1)),
            health_port=health_port,
            metrics_port=metrics_port,
            shutdown_budget=read.duration("JOBWATCH_SHUTDOWN_BUDGET", "10s"),
            secret_ttl=read.duration("JOBWATCH_SECRET_TTL", "10s"),
            secret_qps=read.number("JOBWATCH_SECRET_QPS", "20", 0.1),
            secret_burst=int(read.number("JOBWATCH_SECRET_BURST", "40", 1)),
            delete_qps=read.finite("JOBWATCH_DELETE_QPS", "10", 0.1),
            delete_burst=int(read.finite("JOBWATCH_DELETE_BURST", "20", 1)),
        )


class _Env:
    """Variables of the environment as values of a type, or a `ConfigError` naming the
    variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str) -> str:
        return self._env.get(name, default).strip()

    def number(self, name: str, default: str, minimum: float) -> float:
        raw = self.text(name, default)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if value < minimum:
            raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
        return value

    def finite(self, name: str, default: str, minimum: float) -> float:
        value = self.number(name, default, minimum)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={self.text(name, default)!r} is not a finite number")
        return value

    def duration(self, name: str, default: str) -> float:
        raw = self.text(name, default)
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def port(self, name: str, default: str) -> int:
        # ASCII digits only: int() also takes "+80" and "٨٠", float() "8e1" and "80.9";
        # the operator must never listen on a port that nobody wrote down.
        raw = self.text(name, default)
        if not (raw.isascii() and raw.isdigit()) or int(raw) > 65535:
            raise ConfigError(
                f"{name}={raw!r} is not a port number (1-65535, or 0 for no endpoint)"
            )
        return int(raw)

    def networks(self, name: str) -> list[str]:
        raw = self.text(name, "")
        return [part.strip() for part in raw.split(",") if part.strip()]


def _egress(read: _Env) -> EgressPolicy:
    try:
        deny = parse_networks(",".join(read.networks("JOBWATCH_EGRESS_DENY")))
        allow_text = ",".join(read.networks("JOBWATCH_EGRESS_ALLOW"))
        allow = parse_networks(allow_text) if allow_text else None
    except ValueError as exc:
        raise ConfigError(f"JOBWATCH_EGRESS_DENY/JOBWATCH_EGRESS_ALLOW: {exc}") from None
    return EgressPolicy(deny=deny, allow=allow)


def _labels(read: _Env) -> tuple[tuple[str, str], ...]:
    labels: list[tuple[str, str]] = []
    for part in read.text("JOBWATCH_LABEL_SELECTOR", "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or "!" in key:
            raise ConfigError(
                f"JOBWATCH_LABEL_SELECTOR: {part.strip()!r} is not of the form key=value"
            )
        labels.append((key.strip(), value.strip()))
    return tuple(labels)


def _max_in_flight(read: _Env) -> int:
    return int(read.number("JOBWATCH_MAX_IN_FLIGHT", "200", 1))


def _hosts(read: _Env) -> HostSettings:
    try:
        overrides = parse_limits(read.text("JOBWATCH_HOST_LIMITS", ""))
    except ValueError as exc:
        raise ConfigError(f"JOBWATCH_HOST_LIMITS: {exc}") from None
    cooldown = read.duration("JOBWATCH_HOST_BREAKER_COOLDOWN", "5s")
    max_cooldown = read.duration("JOBWATCH_HOST_BREAKER_MAX_COOLDOWN", "5m")
    if cooldown <= 0 or max_cooldown < cooldown:
        raise ConfigError(
            "JOBWATCH_HOST_BREAKER_COOLDOWN must be above 0 and at most"
            f" JOBWATCH_HOST_BREAKER_MAX_COOLDOWN (they are {cooldown:g}s, {max_cooldown:g}s)"
        )
    max_in_flight = _max_in_flight(read)
    # No rate cap by default: a healthy host gets every poll its watches plan.
    qps = read.finite("JOBWATCH_HOST_QPS", "0", 0)
    if 0 < qps < MIN_HOST_QPS:
        raise ConfigError(
            f"JOBWATCH_HOST_QPS={read.text('JOBWATCH_HOST_QPS', '0')!r} must be 0 (no cap) "
            f"or at least {MIN_HOST_QPS:g}"
        )
    return HostSettings(
        # One host may use every worker when it answers as fast as usual.
        limits=adaptive(
            int(read.finite("JOBWATCH_HOST_MAX_IN_FLIGHT", str(max_in_flight), 1)), qps or None
        ),
        overrides=overrides,
        breaker_failures=int(read.finite("JOBWATCH_HOST_BREAKER_FAILURES", "10", 0)),
        cooldown=cooldown,
        max_cooldown=max_cooldown,
    )


def _leases(read: _Env, identity: str, scope: tuple[tuple[str, str], ...]) -> LeaseSettings | None:
    """Bucketed ownership, on when JOBWATCH_LEASE_NAMESPACE names where the Leases live
    (in a pod: its own namespace, from the downward API)."""
    namespace = read.text("JOBWATCH_LEASE_NAMESPACE", "")
    if not namespace:
        return None
    settings = LeaseSettings(
        namespace=namespace,
        identity=identity,
        group=read.text("JOBWATCH_LEASE_GROUP", "jobwatch"),
        buckets=int(read.number("JOBWATCH_BUCKETS", "32", 1)),
        lease_duration=read.duration("JOBWATCH_LEASE_DURATION", "15s"),
        renew_deadline=read.duration("JOBWATCH_LEASE_RENEW_DEADLINE", "10s"),
        retry_period=read.duration("JOBWATCH_LEASE_RETRY_PERIOD", "2s"),
        scope=scope,
    )
    # client-go's rule: a holder must give up (renew deadline) before others may take
    # over (lease duration), and try more than once (retry period, jittered ±10 %)
    # before its renew deadline.
    if not settings.lease_duration > settings.renew_deadline > 1.2 * settings.retry_period > 0:
        raise ConfigError(
            "JOBWATCH_LEASE_DURATION > JOBWATCH_LEASE_RENEW_DEADLINE > 1.2 x "
            "JOBWATCH_LEASE_RETRY_PERIOD > 0 must hold (they are "
            f"{settings.lease_duration:g}s, {settings.renew_deadline:g}s, "
            f"{settings.retry_period:g}s)"
        )
    if settings.buckets > MAX_BUCKETS:
        raise ConfigError(f"JOBWATCH_BUCKETS={settings.buckets} is above {MAX_BUCKETS}")
    if not _DNS_LABEL.fullmatch(settings.group) or len(settings.group) > 40:
        raise ConfigError(
            f"JOBWATCH_LEASE_GROUP={settings.group!r} must be a DNS label of at most 40 characters"
        )
    return settings
