"""Politeness per job service host, shared by every watch of that host.

Hundreds of JobWatches often poll the same one or two job services. Here they share, per
host: a circuit breaker (a host that keeps failing is left alone for a cool-down, then
tried with a single probe), a limit on requests in flight that adapts to the host's answer
times (`Limit`), an optional fixed rate cap, and a hold set by any `Retry-After` on a 429
or 503.

No request rate is imposed by default: a rate is a guess about a service the operator
knows nothing about, and a healthy host must get every poll its watches plan (1,000
watches at 5 s are 200 requests/s). The host itself says when it has had enough: with
429/503 and `Retry-After`, with failures (the breaker), and with answers that slow down.
Slower answers at a bounded number in flight already mean fewer requests per second
(throughput = in flight / answer time); the adaptive limit lowers the bound on top of
that when the answers slow down, so that a host that queues is not made to queue more.

The host is the first hop's origin, (scheme, host, port) of `spec.url` with the scheme's
default port filled in: redirects are not followed for the key, so a watch redirected
elsewhere still counts for, and waits for, the host its URL names. Only what the first hop
itself does counts against it: a 5xx or a failure after a redirect, a certificate the
watch's own CA bundle does not trust, or a header or CA bundle that cannot be used say
nothing about the host.

The state is kept per namespace and host. The namespace is Kubernetes' tenancy boundary,
and a shared gateway often routes one origin to many tenants' backends: one tenant's
backend answering 503 (or `Retry-After: 300`), or its slow requests filling the in-flight
limit, must not hold another namespace's watches. Within a namespace, where one team's
hundreds of watches poll the same service, everything is shared. A gateway that serves K
namespaces thus sees up to K times one namespace's requests in flight (and rate cap).

Pure: no I/O and no clock of its own. Every call takes `now` (the runtime's wall clock,
epoch seconds, the same clock watches are planned on), `done` the exchange's answer time
as the runtime measured it (the rate caps' token buckets read the `now` of the call they
serve), and a `rand()` in [0, 1) is given at construction, so every transition is
reproducible with a fake clock.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum

from yarl import URL

from jobwatch.core.outcome import FailureKind, Outcome, Response
from jobwatch.kits.ratelimit import TokenBucket

Origin = tuple[str, str, int]  # scheme, host (lower case, no brackets), port
HostKey = tuple[str, Origin]  # namespace, origin

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A rate cap lets this many seconds' worth of requests through at once: a few requests,
# never the whole first round of a fleet.
BURST_SECONDS = 0.1
# A watch held because the host's requests in flight are at the limit, or because its
# breaker's probe is still out, looks again after about this long (spread up to twice
# that): neither has a known end. (For the first, the runtime lets a waiting poll go as
# soon as a request to the host ends: this is the fallback.)
RECHECK_SECONDS = 0.5
# Each watch polls the same URL again and again: its origin is parsed once, for up to
# this many distinct URLs.
MAX_PARSED_URLS = 16384
# Label values of the per-host metrics: at most this many hosts by name, the rest "other".
MAX_LABELLED_HOSTS = 50

# The adaptive in-flight limit (`Limit`). It starts at, and never goes below, this many
# (or the ceiling, when that is lower): the fixed cap before it adapted, so no host is
# offered less than it was, and the initial and least limit of Netflix's Gradient2.
MIN_IN_FLIGHT = 20
# It is revised once per window of exchanges: at least this long and this many, so that
# one slow answer, or a burst at a quiet host, decides nothing.
WINDOW_SECONDS = 0.5
WINDOW_EXCHANGES = 10
# The host's answers count as slowed down when the median answer of a window took longer
# than its usual answer time x TOLERANCE + SLACK. The median: a queue at the host delays
# most answers whatever its order (a worker pool's lock lets some newcomers in first, so
# the fastest answer says little), while this process's own hiccups (a GC pause, a busy
# event loop at thousands of polls/s) and a few slow jobs delay a few. TOLERANCE is
# Gradient2's; SLACK keeps the operator's own lag at loopback-fast hosts (a few ms usual)
# from reading as the host's.
TOLERANCE = 1.5
SLACK = 0.1
# The median is taken of at most this many answers of a window, evenly thinned.
SAMPLES = 64
# Slower answers shrink the limit by their ratio to that bound, by at most this factor per
# window: a real queue persists and is followed within a few windows, a stall once is not.
SHRINK = 0.8
# A window in which at least this share of exchanges failed (no answer, 5xx) or asked to
# wait (Retry-After) halves the limit: the host says it is overloaded, as TCP's loss does.
OVERLOAD_SHARE = 0.1
BACKOFF = 0.5
# The usual answer time follows faster answers quickly, slower ones slowly, and slower ones
# only while the watches do not press on the limit (else the queue they cause would
# become the norm, and grow).
LEARN_FASTER, LEARN_SLOWER = 0.5, 0.1


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class HeldReason(StrEnum):
    """Why a poll was not sent: the watch's status `reason` while it waits."""

    CIRCUIT_OPEN = "HostCircuitOpen"
    RATE_LIMITED = "HostRateLimited"
    RETRY_AFTER = "HostRetryAfter"


class Verdict(Enum):
    """What an exchange says about the host (not about the job)."""

    ANSWERED = "answered"  # any HTTP answer below 500, a body over the cap, bad JSON...
    FAILED = "failed"  # no answer (connect, DNS, TLS, timeout) or a 5xx
    NOTHING = "nothing"  # nothing was sent (egress denied, cancelled, an internal fault)


@dataclass(frozen=True, slots=True)
class HostLimits:
    qps: float | None  # requests per second, sustained; None: no cap
    max_in_flight: int  # the in-flight limit's ceiling
    # ... and its floor: equal to the ceiling, the limit is fixed; below it, it adapts.
    min_in_flight: int


def adaptive(max_in_flight: int, qps: float | None = None) -> HostLimits:
    """The default: an in-flight limit between MIN_IN_FLIGHT and `max_in_flight` that
    follows the host's answer times."""
    return HostLimits(qps, max_in_flight, min(MIN_IN_FLIGHT, max_in_flight))


def fixed(qps: float | None, in_flight: int) -> HostLimits:
    """An override for a service with a known quota: exactly these limits."""
    return HostLimits(qps, in_flight, in_flight)


@dataclass(frozen=True, slots=True)
class HostSettings:
    # Up to JOBWATCH_MAX_IN_FLIGHT's default: the configuration passes the real one.
    limits: HostLimits = field(default_factory=lambda: adaptive(200))
    # "host:port" (host lower case, IPv6 without brackets) -> its own limits, any scheme
    overrides: Mapping[str, HostLimits] = field(default_factory=dict)
    breaker_failures: int = 10  # transient failures in a row that open it; 0: no breaker
    cooldown: float = 5.0  # the first open period; doubles at each re-open
    max_cooldown: float = 300.0  # and the longest; also the longest Retry-After hold
    max_hosts: int = 10_000


@dataclass(frozen=True, slots=True)
class Held:
    """A poll not sent: try again at `until` (epoch seconds)."""

    reason: HeldReason
    until: float
    message: str
    slot: bool = False  # a rate-limit slot at `until` is kept for this watch


def _origin(url: str) -> Origin:
    # Parsed as the HTTP client parses it (yarl), so that the host a watch counts for is
    # the host its requests go to.
    try:
        parsed = URL(url)
    except (ValueError, TypeError):  # never requested either: the client refuses it
        return "", "", 0
    scheme = parsed.scheme
    return scheme, parsed.host or "", parsed.port or _DEFAULT_PORTS.get(scheme, 0)


def origin(key: HostKey) -> str:
    scheme, host, port = key[1]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def verdict(outcome: Outcome) -> Verdict:
    if isinstance(outcome, Response):
        if outcome.redirects:
            return Verdict.ANSWERED  # the first hop answered; the rest is elsewhere
        return Verdict.FAILED if outcome.code >= 500 else Verdict.ANSWERED
    if outcome.kind is FailureKind.TRANSPORT:
        return Verdict.FAILED if outcome.host_failed else Verdict.NOTHING
    if outcome.kind is FailureKind.EGRESS_DENIED:
        return Verdict.NOTHING
    return Verdict.ANSWERED  # an invalid response is still an answer


@dataclass(slots=True, eq=False)
class Limit:
    """One host's limit on requests in flight, between `floor` and `ceiling`: a gradient
    on the host's answer times, revised once per window of exchanges (after Netflix's
    concurrency-limits Gradient2 and Envoy's adaptive concurrency filter).

    It grows while the watches press on it (half of it or more in flight at once) and the
    host answers about as fast as usual: it doubles per window until it first has to
    shrink (TCP's slow start, so that a large fleet is not held back for long at its
    start), and grows by its square root per window after that. It shrinks in
    proportion when the answers slow down, and halves when the host fails or asks to wait.
    Requests in flight then bound the rate the host gets: a host that answers more slowly
    gets fewer requests per second, and is not made to queue more than it did."""

    floor: int
    ceiling: int
    value: float = 0.0  # the limit; whole requests of it are allowed
    usual: float | None = None  # the host's usual answer time, seconds; None: not seen yet
    # The current window.
    opened: float | None = None
    exchanges: int = 0
    overloads: int = 0  # failures of the host and Retry-After answers
    answers: list[float] = field(default_factory=list)  # answer times, every `stride`th
    stride: int = 1
    answered: int = 0
    busiest: int = 0  # most requests in flight at once
    starting: bool = True  # doubling, until the first time it shrinks

    def __post_init__(self) -> None:
        self.value = float(self.floor)

    @property
    def allowed(self) -> int:
        return int(self.value)

    def sent(self, in_flight: int) -> None:
        self.busiest = max(self.busiest, in_flight)

    def ended(self, now: float, answered: float | None, overload: bool, in_flight: int) -> None:
        """An exchange ended: `answered` is the answer time of an answer (None: none came),
        `overload` whether the host failed or asked to wait; `in_flight` are still out."""
        if self.floor == self.ceiling:
            return
        if self.opened is None:
            self.opened = now
        self.exchanges += 1
        self.overloads += overload
        if answered is not None:
            self.answered += 1
            if self.answered % self.stride == 0:
                self.answers.append(answered)
                if len(self.answers) >= SAMPLES:
                    del self.answers[::2]
                    self.stride *= 2
        if self.exchanges >= WINDOW_EXCHANGES and now - self.opened >= WINDOW_SECONDS:
            self._revise()
            self._open(now, in_flight)

    def _revise(self) -> None:
        value, answers = self.value, sorted(self.answers)
        pressed = self.busiest >= value / 2
        if self.overloads and self.overloads >= OVERLOAD_SHARE * self.exchanges:
            value *= BACKOFF
            self.starting = False
        elif answers:
            median = answers[len(answers) // 2]
            usual = median if self.usual is None else self.usual
            bound = usual * TOLERANCE + SLACK
            if median > bound:
                value *= max(SHRINK, bound / median)
                self.starting = False
            elif pressed:
                value += value if self.starting else math.sqrt(value)
            if median < usual:
                usual += LEARN_FASTER * (median - usual)
            elif not pressed:
                usual += LEARN_SLOWER * (median - usual)
            self.usual = usual
        self.value = min(max(value, float(self.floor)), float(self.ceiling))

    def _open(self, now: float | None, in_flight: int) -> None:
        """A fresh window."""
        self.opened, self.exchanges, self.overloads, self.busiest = now, 0, 0, in_flight
        self.answers, self.stride, self.answered = [], 1, 0

    def reset(self) -> None:
        """The breaker opened: start again from the floor, with a fresh window."""
        self.value, self.starting = float(self.floor), True
        self._open(None, 0)


@dataclass(slots=True, eq=False)
class Host:
    """One host's shared state. A `Host` handed out by `Hosts.admit` is handed back to
    `Hosts.done`, even if the table evicted it meanwhile."""

    key: HostKey
    limits: HostLimits
    limit: Limit
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # transient failures in a row, across the host's watches
    reopens: int = 0  # opens since the breaker was last closed: the cool-down's exponent
    open_until: float = 0.0
    probe_out: bool = False
    hold_until: float = 0.0  # Retry-After
    # The rate cap, if any. A held watch books its token (its slot), so a crowd of held
    # watches is spread, not re-herded.
    bucket: TokenBucket | None = None
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Probe:
    """The single request of a half-open breaker."""

    host: Host


Ticket = Host | Probe


class Hosts:
    """A bounded table of hosts, least recently used first: an evicted host starts
    fresh (closed, no hold) when it is next polled."""

    def __init__(self, settings: HostSettings, rand: Callable[[], float]) -> None:
        self._settings, self._rand = settings, rand
        self._hosts: OrderedDict[HostKey, Host] = OrderedDict()
        self.held: dict[HeldReason, int] = dict.fromkeys(HeldReason, 0)
        # host label -> polls its limits delayed, and the seconds they waited in all
        self._delays: dict[str, tuple[int, float]] = {}
        # The time of the call being served: the clock of the hosts' rate-cap buckets.
        self._now = 0.0
        self._origin = functools.lru_cache(maxsize=MAX_PARSED_URLS)(_origin)

    def key(self, namespace: str, url: str) -> HostKey:
        """The host a watch counts for: its namespace and its URL's first hop's origin."""
        return namespace, self._origin(url)

    def __len__(self) -> int:
        return len(self._hosts)

    def get(self, key: HostKey) -> Host | None:
        return self._hosts.get(key)

    def admit(self, key: HostKey, now: float, reserved: bool = False) -> Ticket | Held:
        """May a watch of `key` send now? A ticket (hand it to `done` whatever happens),
        or when to try again. `reserved`: the watch was given a rate-limit slot by the
        `Held` it waits on, and it is that slot's time now."""
        self._now = now
        host = self._hosts.get(key)
        if host is None:
            host = self._add(key)
        else:
            self._hosts.move_to_end(key)
        ticket: Ticket = host
        if host.state is not BreakerState.CLOSED:
            if host.state is BreakerState.OPEN and now >= host.open_until:
                host.state = BreakerState.HALF_OPEN
            if host.state is BreakerState.OPEN or host.probe_out:
                until = (
                    host.open_until
                    if host.state is BreakerState.OPEN
                    else now + self._recheck(host)
                )
                return self._held(host, HeldReason.CIRCUIT_OPEN, until)
            host.probe_out = True
            ticket = Probe(host)
        if now < host.hold_until:
            self._undo_probe(ticket)
            return self._held(host, HeldReason.RETRY_AFTER, host.hold_until)
        if host.in_flight >= host.limit.allowed:
            self._undo_probe(ticket)
            return self._held(host, HeldReason.RATE_LIMITED, now + self._recheck(host))
        bucket = host.bucket
        if bucket is not None and not reserved:
            wait = bucket.delay()
            bucket.take()  # now, or on credit: this watch's slot, kept for it
            if wait > 0:
                self._undo_probe(ticket)
                return self._held(host, HeldReason.RATE_LIMITED, now + wait, slot=True)
        host.in_flight += 1
        host.limit.sent(host.in_flight)
        return ticket

    def done(
        self,
        ticket: Ticket,
        verdict: Verdict,
        now: float,
        retry_after: float | None,
        latency: float | None = None,
    ) -> None:
        """The exchange of an admitted poll ended (or never happened: `Verdict.NOTHING`).
        `retry_after`: seconds a 429/503 asked for, if it did; `latency`: how long the
        exchange took, seconds."""
        self._now = now
        host = ticket.host if isinstance(ticket, Probe) else ticket
        probe = host is not ticket
        host.in_flight = max(0, host.in_flight - 1)
        if retry_after is not None:
            hold = now + min(retry_after, self._settings.max_cooldown)
            host.hold_until = max(host.hold_until, hold)
        if probe:
            host.probe_out = False
        if verdict is Verdict.NOTHING:
            return
        if host.state is BreakerState.CLOSED:
            answered = latency if verdict is Verdict.ANSWERED else None
            overload = verdict is Verdict.FAILED or retry_after is not None
            host.limit.ended(now, answered, overload, host.in_flight)
        if verdict is Verdict.ANSWERED:
            host.failures = 0
            if probe:  # a late answer to a request sent before the opening says less
                host.state, host.reopens = BreakerState.CLOSED, 0
                # The round after a close is spread from here: slots booked before the
                # breaker opened are void.
                host.bucket = self._bucket(host.limits)
            return
        # A failure of a request sent before the breaker opened says nothing new.
        if host.state is BreakerState.CLOSED:
            host.failures += 1
            limit = self._settings.breaker_failures
            if limit and host.failures >= limit:
                self._open(host, now)
        elif probe:
            self._open(host, now)

    def _open(self, host: Host, now: float) -> None:
        settings = self._settings
        cooldown = min(settings.cooldown * 2.0 ** min(host.reopens, 64), settings.max_cooldown)
        host.state, host.open_until = BreakerState.OPEN, now + cooldown
        host.reopens += 1
        host.failures = 0
        host.limit.reset()

    def states(self) -> dict[str, dict[str, int]]:
        """Hosts whose breaker is not closed, for the gauge: per origin, how many
        namespaces' breakers of it are in each state; at most MAX_LABELLED_HOSTS origins
        by name (the most recently polled), the rest counted under "other"."""
        by_host: dict[str, dict[str, int]] = {}
        for key in reversed(self._hosts):
            host = self._hosts[key]
            if host.state is BreakerState.CLOSED:
                continue
            label = origin(key)
            if label not in by_host and len(by_host) >= MAX_LABELLED_HOSTS:
                label = "other"
            counts = by_host.setdefault(label, {})
            counts[host.state] = counts.get(host.state, 0) + 1
        return by_host

    def room(self, key: HostKey, now: float) -> bool:
        """Whether a poll of `key` held for want of a slot in flight could go now."""
        host = self._hosts.get(key)
        return (
            host is not None
            and host.state is BreakerState.CLOSED
            and now >= host.hold_until
            and host.in_flight < host.limit.allowed
        )

    def delayed(self, key: HostKey, seconds: float) -> None:
        """A poll of `key` held by the host's limits (in flight or rate) went out, or was
        held for another reason, `seconds` after they first held it."""
        label = origin(key)
        if label not in self._delays and len(self._delays) >= MAX_LABELLED_HOSTS:
            label = "other"
        polls, waited = self._delays.get(label, (0, 0.0))
        self._delays[label] = (polls + 1, waited + seconds)

    def delays(self) -> dict[str, tuple[int, float]]:
        """For the counters of polls delayed by their host's limits: per origin, how many
        and how long in all. A label once given stays (a counter must not move between
        series): the first MAX_LABELLED_HOSTS origins delayed by name, later ones as
        "other"."""
        return dict(self._delays)

    def _add(self, key: HostKey) -> Host:
        settings = self._settings
        limits = settings.overrides.get(_override_key(key), settings.limits)
        limit = Limit(limits.min_in_flight, limits.max_in_flight)
        host = self._hosts[key] = Host(key, limits, limit, bucket=self._bucket(limits))
        if len(self._hosts) > settings.max_hosts:
            self._hosts.popitem(last=False)
        return host

    def _bucket(self, limits: HostLimits) -> TokenBucket | None:
        if limits.qps is None:
            return None
        # A burst of BURST_SECONDS' worth on top of the one request a token is for.
        return TokenBucket(limits.qps, 1 + BURST_SECONDS * limits.qps, lambda: self._now)

    def _recheck(self, host: Host) -> float:
        qps = host.limits.qps
        return max(RECHECK_SECONDS, 1.0 / qps if qps else 0.0) * (1.0 + self._rand())

    def _held(self, host: Host, reason: HeldReason, until: float, slot: bool = False) -> Held:
        self.held[reason] += 1
        return Held(reason, until, _message(host, reason, until, slot), slot)

    @staticmethod
    def _undo_probe(ticket: Ticket) -> None:
        if isinstance(ticket, Probe):
            ticket.host.probe_out = False


def _override_key(key: HostKey) -> str:
    _, host, port = key[1]
    return f"{host}:{port}"


def _message(host: Host, reason: HeldReason, until: float, slot: bool) -> str:
    where = origin(host.key)
    # An absolute time: the message of a watch held again for the same reason is the same,
    # and costs no status write.
    stamp = datetime.fromtimestamp(until, UTC)
    wait = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if reason is HeldReason.CIRCUIT_OPEN:
        if host.state is BreakerState.HALF_OPEN:
            return (
                f"not sent: the circuit breaker of {where} is half-open and its one trial "
                f"request is out; looking again at {wait}"
            )
        return (
            f"not sent: the circuit breaker of {where} is open after transient errors in a "
            f"row across this namespace's JobWatches; next try at {wait}"
        )
    if reason is HeldReason.RETRY_AFTER:
        return (
            f"not sent: {where} asked this namespace's JobWatches of it to wait (Retry-After); "
            f"next try at {wait}"
        )
    limits = host.limits
    if slot:
        return f"not sent: {where} is at its limit of {limits.qps:g} requests/s; next try at {wait}"
    how = (
        "fixed"
        if limits.min_in_flight == limits.max_in_flight
        else f"adaptive, {limits.min_in_flight} to {limits.max_in_flight}, lower while its "
        "answers are slower than usual"
    )
    return (
        f"not sent: requests in flight to {where} from this namespace's JobWatches: "
        f"{host.in_flight}, at its limit of {host.limit.allowed} ({how}); next try at {wait}"
    )


def parse_limits(text: str) -> dict[str, HostLimits]:
    """`host:port=qps/inflight,...` (IPv6 in brackets) as `HostSettings.overrides`: fixed
    limits, a qps of 0 for no rate cap. Raises ValueError saying which entry is wrong."""
    limits: dict[str, HostLimits] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        where, sep, values = entry.partition("=")
        host, colon, port = where.strip().rpartition(":")
        qps, slash, in_flight = values.partition("/")
        host = host.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            if not (sep and colon and slash and host and port.isascii() and port.isdigit()):
                raise ValueError
            rate, cap = float(qps), int(in_flight)
            if not (0 <= rate < float("inf")) or cap < 1 or not 0 < int(port) <= 65535:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{entry!r} is not of the form host:port=qps/inflight "
                "(qps 0 for no cap or above, inflight at least 1)"
            ) from None
        limits[f"{host}:{int(port)}"] = fixed(rate or None, cap)
    return limits
