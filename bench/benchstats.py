"""Arithmetic for the scale benchmark: Prometheus text, histogram quantiles, percentiles, fits.

Pure functions, no I/O, so the figures can be re-derived from a results file.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# cumulative histogram: (upper bound `le`, observations <= le), ascending, +Inf last
Buckets = list[tuple[float, float]]


def parse_prometheus(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for (sample, labels), number in samples.items():
        if sample == name:
            key = dict(labels).get(label, "")
            found[key] = found.get(key, 0.0) + number
    return found


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted({*after, *before})}


def buckets(samples: Samples, histogram: str) -> Buckets:
    found = [
        (float(dict(labels)["le"]), number)
        for (sample, labels), number in samples.items()
        if sample == f"{histogram}_bucket"
    ]
    return sorted(found)


def bucket_delta(after: Buckets, before: Buckets) -> Buckets:
    """What was observed between two scrapes of the same histogram."""
    earlier = dict(before)
    return [(le, count - earlier.get(le, 0.0)) for le, count in after]


def total(histogram: Buckets) -> float:
    return histogram[-1][1] if histogram else 0.0


def quantile(histogram: Buckets, q: float) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket holding rank q.

    In the +Inf bucket the answer is the largest finite bound (a lower bound of the
    truth). None when the histogram is empty.
    """
    count = total(histogram)
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cumulative in histogram:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


def max_bound(histogram: Buckets) -> float | None:
    """Upper bound of the highest non-empty bucket: the most a histogram can say of its max.

    math.inf when something landed above the largest finite bound.
    """
    count = total(histogram)
    if count <= 0:
        return None
    for le, cumulative in histogram:
        if cumulative >= count:
            return le
    return math.inf


def fraction_within(histogram: Buckets, bound: float) -> float | None:
    """Share of observations <= bound; `bound` must be one of the bucket bounds."""
    count = total(histogram)
    if count <= 0:
        return None
    for le, cumulative in histogram:
        if math.isclose(le, bound):
            return cumulative / count
    raise ValueError(f"{bound} is not a bucket bound of this histogram")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def linear_fit(points: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = slope * x + intercept; None with fewer than two distinct x."""
    pairs = list(points)
    xs = {x for x, _ in pairs}
    if len(xs) < 2:
        return None
    n = len(pairs)
    mean_x = sum(x for x, _ in pairs) / n
    mean_y = sum(y for _, y in pairs) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in pairs)
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


def gaps(requests: Mapping[str, Sequence[float]], start: float, end: float) -> list[float]:
    """Seconds between successive requests for the same job, as the job service saw them.

    A gap belongs to the span [start, end) its later request falls in; `requests` holds
    each job's request times in order (wall clock).
    """
    found: list[float] = []
    for times in requests.values():
        for earlier, later in itertools.pairwise(times):
            if start <= later < end:
                found.append(later - earlier)
    return found


def answer_gaps(
    requests: Mapping[str, Sequence[float]],
    delays: Mapping[str, Sequence[float]],
    start: float,
    end: float,
) -> tuple[list[float], int]:
    """Seconds from each answer to the job's next request, and how many gaps followed a
    request that was never answered (a negative delay), which have no answer to time from.

    `delays[job][k]` is how long the k-th request's answer was held (none: answered at
    once). With answers that take time, a request planned from the previous answer comes
    a whole answer time after the previous request: this tells the plan from the wait.
    """
    found: list[float] = []
    unanswered = 0
    for job, times in requests.items():
        held = delays.get(job, ())
        for k in range(1, len(times)):
            if not start <= times[k] < end:
                continue
            delay = held[k - 1] if k - 1 < len(held) else 0.0
            if delay < 0:
                unanswered += 1
            else:
                found.append(times[k] - times[k - 1] - delay)
    return found, unanswered


def gap_summary(values: Sequence[float], late_after: float) -> dict[str, float | int | None]:
    """Mean, p1 / p50 / p99 / max of the gaps, and the share longer than `late_after`
    seconds."""
    late = sum(1 for v in values if v > late_after)
    return {
        "count": len(values),
        "mean_s": rounded(sum(values) / len(values)) if values else None,
        "p1_s": rounded(percentile(values, 0.01)),
        "p50_s": rounded(percentile(values, 0.5)),
        "p99_s": rounded(percentile(values, 0.99)),
        "max_s": rounded(max(values, default=None)),
        "late_after_s": round(late_after, 3),
        "late": late,
        "late_share": round(late / len(values), 6) if values else None,
    }


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


_APISERVER_REQUEST = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION")


def apiserver_counters(text: str) -> dict[str, float]:
    """From kube-apiserver /metrics: 429s, APF rejections, and the writes it served.

    The operator's own writes, as the server counted them: `status_patches` and
    `status_patch_failures` (PATCH jobwatches/status, 2xx and any other code),
    `events_created` and `event_failures` (POST events). Every write by verb, resource
    and code is also kept as "write VERB resource[/subresource] CODE", to show what
    else wrote (kopf annotations, other components) in the same span.

    A line scan rather than a full parse: the API server's /metrics is several MB and
    the harness shares two cores with what it measures.
    """
    counters = {
        "429": 0.0,
        "rejected_apf": 0.0,
        "status_patches": 0.0,
        "status_patch_failures": 0.0,
        "events_created": 0.0,
        "event_failures": 0.0,
    }
    for line in text.splitlines():
        if line.startswith("apiserver_flowcontrol_rejected_requests_total{"):
            counters["rejected_apf"] += float(line.rsplit(" ", 1)[1])
            continue
        match = _APISERVER_REQUEST.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        number = float(match["value"])
        code, verb = labels.get("code", ""), labels.get("verb", "")
        resource, subresource = labels.get("resource", ""), labels.get("subresource", "")
        if code == "429":
            counters["429"] += number
        if verb not in _WRITE_VERBS:
            continue
        ok = code.startswith("2")
        if verb == "PATCH" and resource == "jobwatches" and subresource == "status":
            counters["status_patches" if ok else "status_patch_failures"] += number
        if verb == "POST" and resource == "events":
            counters["events_created" if ok else "event_failures"] += number
        key = f"write {verb} {resource}{'/' + subresource if subresource else ''} {code}"
        counters[key] = counters.get(key, 0.0) + number
    return counters
