"""Prometheus metrics, served on JOBWATCH_METRICS_PORT at /metrics.

Labels are bounded sets (reasons, results): never a URL, a header or a name,
so neither secrets nor cardinality can leak in through them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobwatch.kits import endpoints

_Collector = TypeVar("_Collector", bound=Collector)

# Fine steps up to a quarter second, where the lag targets (50 ms, 250 ms) and most HTTP
# exchanges fall; up to a minute for an overloaded process's tail and slow endpoints.
_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 0.75, 1, 1.5, 2, 2.5, 5, 10, 30, 60,
)  # fmt: skip


class _Backlog:
    """`jobwatch_status_backlog`, read from the status writer's queues at scrape time.

    A gauge set on every submit would cost the write path a call per status change, at
    thousands a minute; reading the queue lengths per scrape costs nothing in between.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] = lambda: {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "jobwatch_status_backlog",
            "Status writes and Events queued, by kind (final, urgent, progress, events).",
            labels=["kind"],
        )
        for kind, count in self.source().items():
            family.add_metric([kind], count)
        yield family


class _Internals:
    """`jobwatch_scheduler_entries` and `jobwatch_asyncio_tasks`, read at scrape time: a
    steady fleet must hold both steady (the soak benchmark watches them for leaks)."""

    def __init__(self) -> None:
        self.scheduler_entries: Callable[[], int] = lambda: 0

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "jobwatch_scheduler_entries",
            "Entries in the scheduler's heap, replaced and cancelled ones included.",
            value=self.scheduler_entries(),
        )
        yield GaugeMetricFamily(
            "jobwatch_asyncio_tasks", "Tasks of the event loop.", value=_tasks()
        )


@dataclass(frozen=True, slots=True)
class FleetFigures:
    by_phase: Mapping[str, int]  # phase -> watches in it
    deadline_overrun: float  # seconds the most overdue unfinished watch is past its deadline


class _Fleet:
    """`jobwatch_watches`, `jobwatch_watches_by_phase` and
    `jobwatch_deadline_overrun_seconds`, computed from the watches at scrape time (a pass
    over 10k watches: a few ms per scrape, nothing per poll)."""

    def __init__(self) -> None:
        self.source: Callable[[], FleetFigures] = lambda: FleetFigures({}, 0.0)

    def collect(self) -> Iterable[Metric]:
        figures = self.source()
        yield GaugeMetricFamily(
            "jobwatch_watches",
            "JobWatches known to this operator.",
            value=sum(figures.by_phase.values()),
        )
        by_phase = GaugeMetricFamily(
            "jobwatch_watches_by_phase", "JobWatches known, by status.phase.", labels=["phase"]
        )
        for phase, count in figures.by_phase.items():
            by_phase.add_metric([phase], count)
        yield by_phase
        yield GaugeMetricFamily(
            "jobwatch_deadline_overrun_seconds",
            "How far past its deadline the most overdue JobWatch that has not ended is; 0 "
            "when none is (a watch past its deadline should end within a poll).",
            value=figures.deadline_overrun,
        )


@dataclass(frozen=True, slots=True)
class HostFigures:
    breakers: Mapping[str, Mapping[str, int]]  # host label -> breaker state -> hosts
    held: Mapping[str, int]  # reason -> polls not sent since start
    hosts: int  # hosts in the table
    delays: Mapping[str, tuple[int, float]]  # host label -> polls delayed, seconds in all


class _Hosts:
    """`jobwatch_host_breaker_state`, `jobwatch_host_polls_held_total`,
    `jobwatch_host_polls_delayed_total`, `jobwatch_host_poll_delay_seconds_total` and
    `jobwatch_hosts`, read from the host table at scrape time (nothing per poll).

    The `host` label is bounded: for the breaker, only hosts whose breaker is not closed,
    at most hosts.MAX_LABELLED_HOSTS of them by origin (the most recently polled), the
    others summed under host="other" (a closed breaker has no series); for the delays,
    the first MAX_LABELLED_HOSTS origins delayed, later ones under host="other"."""

    def __init__(self) -> None:
        self.source: Callable[[], HostFigures] = lambda: HostFigures({}, {}, 0, {})

    def collect(self) -> Iterable[Metric]:
        figures = self.source()
        breakers = GaugeMetricFamily(
            "jobwatch_host_breaker_state",
            "Job service hosts whose circuit breaker is not closed, by host (origin, at most "
            '50; the rest as host="other") and state (open, half-open).',
            labels=["host", "state"],
        )
        for host, states in figures.breakers.items():
            for state, count in states.items():
                breakers.add_metric([host, state], count)
        yield breakers
        held = CounterMetricFamily(
            "jobwatch_host_polls_held",
            "Polls not sent because of their host's shared limits, by reason "
            "(HostCircuitOpen, HostRateLimited, HostRetryAfter).",
            labels=["reason"],
        )
        for reason, count in figures.held.items():
            held.add_metric([reason], count)
        yield held
        delayed = CounterMetricFamily(
            "jobwatch_host_polls_delayed",
            "Polls their host's limits (requests in flight, or a rate cap) held back, by host "
            '(origin, at most 50; the rest as host="other"); counted when they go out.',
            labels=["host"],
        )
        delay = CounterMetricFamily(
            "jobwatch_host_poll_delay_seconds",
            "How late their host's limits made those polls, in all, by host.",
            labels=["host"],
        )
        for host, (polls, seconds) in figures.delays.items():
            delayed.add_metric([host], polls)
            delay.add_metric([host], seconds)
        yield delayed
        yield delay
        yield GaugeMetricFamily(
            "jobwatch_hosts",
            "Job service hosts (scheme, host, port) in the shared host table.",
            value=figures.hosts,
        )


@dataclass(frozen=True, slots=True)
class LeaseFigures:
    held: frozenset[int]  # buckets this replica holds
    live: int  # replicas it sees alive, itself included
    share: int  # buckets it aims to hold


class _Leases:
    """`jobwatch_bucket_held{bucket}` (one series per bucket held: at most
    JOBWATCH_BUCKETS), `jobwatch_replicas` and `jobwatch_bucket_share`, read at scrape
    time. Nothing with a single replica (no Leases)."""

    def __init__(self) -> None:
        self.source: Callable[[], LeaseFigures] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.source is None:
            return
        figures = self.source()
        held = GaugeMetricFamily(
            "jobwatch_bucket_held",
            "1 for each bucket whose Lease this replica holds (it polls those JobWatches).",
            labels=["bucket"],
        )
        for bucket in sorted(figures.held):
            held.add_metric([str(bucket)], 1)
        yield held
        yield GaugeMetricFamily(
            "jobwatch_replicas", "Replicas this one sees alive (member Leases).", value=figures.live
        )
        yield GaugeMetricFamily(
            "jobwatch_bucket_share",
            "Buckets this replica aims to hold: ceil(buckets / live replicas).",
            value=figures.share,
        )


def _poll_metrics(r: CollectorRegistry) -> tuple[Counter, Histogram, Histogram]:
    polls = Counter(
        "jobwatch_polls",
        "Attempts by what they decided (status reason).",
        ["reason"],
        registry=r,
    )
    poll_lag = Histogram(
        "jobwatch_poll_lag_seconds",
        "How late a poll started against its plan.",
        buckets=_SECONDS_BUCKETS,
        registry=r,
    )
    request_seconds = Histogram(
        "jobwatch_request_seconds",
        "Duration of one attempt's HTTP exchange.",
        buckets=_SECONDS_BUCKETS,
        registry=r,
    )
    return polls, poll_lag, request_seconds


def _write_metrics(r: CollectorRegistry) -> tuple[Counter, Counter, Counter, Counter, Counter]:
    """Status writes, Events, and internal errors, in the order they are registered."""
    status_writes = Counter(
        "jobwatch_status_writes", "Status writes by result.", ["result"], registry=r
    )
    events_dropped = Counter(
        "jobwatch_events_dropped",
        "Phase changes in no Event: too many kinds of Event waiting, or the API server "
        "refused the Event again and again.",
        registry=r,
    )
    internal_errors = Counter(
        "jobwatch_internal_errors",
        "Unexpected faults inside the operator, each the error of one watch, by stage.",
        ["stage"],
        registry=r,
    )
    events_created = Counter(
        "jobwatch_events_created", "Events the API server accepted.", registry=r
    )
    events_aggregated = Counter(
        "jobwatch_events_aggregated",
        "Phase changes that went out inside an aggregated Event (its count, less the one "
        "it was created for) rather than as an Event of their own.",
        registry=r,
    )
    return status_writes, events_dropped, internal_errors, events_created, events_aggregated


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped from outside a running loop (tests)
        return 0


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.polls, self.poll_lag, self.request_seconds = _poll_metrics(r)
        (
            self.status_writes,
            self.events_dropped,
            self.internal_errors,
            self.events_created,
            self.events_aggregated,
        ) = _write_metrics(r)
        # Read at scrape time from what plugs its source in: the status writer its queue
        # lengths (StatusWriter.backlog); the runtime the scheduler, the watches and the
        # host table (Runtime.__init__); the lease elector itself, with replicas only
        # (startup.build).
        self.status_backlog = self._scraped(_Backlog())
        self.internals = self._scraped(_Internals())
        self.fleet = self._scraped(_Fleet())
        self.hosts = self._scraped(_Hosts())
        self.leases = self._scraped(_Leases())
        ProcessCollector(registry=r)  # CPU, memory, start time: for dashboards and alerts
        self.queued = Gauge(
            "jobwatch_polls_queued", "Polls that are due but wait for a free worker.", registry=r
        )
        self.ttl_deletions = Counter(
            "jobwatch_ttl_deletions",
            "Deletions of finished JobWatches after spec.ttlSecondsAfterFinished, by outcome "
            "(deleted, gone: there was nothing to delete, conflict: the object changed since "
            "the decision and is decided on again, failed: retried with backoff).",
            ["outcome"],
            registry=r,
        )

    def _scraped(self, collector: _Collector) -> _Collector:
        self.registry.register(collector)
        return collector

    async def serve(self, listener: socket.socket) -> web.AppRunner:
        """Serves /metrics on a socket bound at start-up (see __main__.listen)."""

        async def handle(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.registry),
                headers={"content-type": CONTENT_TYPE_PLAIN_0_0_4},
            )

        return await endpoints.serve(listener, "/metrics", handle)
