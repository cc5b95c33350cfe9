"""The handover codec (layer: control, sharding; pure): a watch's timing as a bucket's
previous holder left it (`Handed`), and how it travels on the released bucket Lease
(HANDOVER_ANNOTATION).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# On a released bucket Lease: when each of its watches last polled and was to poll next,
# and its attempts, for the next holder (see `Handover.hand_over`).
HANDOVER_ANNOTATION = "jobwatch.dev/handover"
# Annotations of an object may take 256 KiB in all; beyond this the handover is left
# out and the next holder resumes from status alone (more buckets keep it small: about
# 40 bytes per watch, so 4,000 watches a bucket).
MAX_HANDOVER_BYTES = 160_000


@dataclass(frozen=True, slots=True)
class Handed:
    """A watch's timing as its previous holder left it: epoch seconds of the end of its
    last request and of its next planned poll, and its attempts. Newer than its status,
    whose progress is written only every progress interval."""

    last_end: float | None
    next_poll: float | None
    attempts: int
    # A request the previous holder cut at the handover (its socket closed): when it
    # was sent. The job service may still be working on it, up to the request timeout.
    in_flight_since: float | None = None


def encode_handover(handed: Mapping[tuple[str, str], Handed], now: float) -> str | None:
    """`{"t": now in ms since the epoch, "w": {namespace: {name: [last end, next poll,
    attempts, in flight since]}}}`, times in tenths of a second from `t`, rounded up (a
    watch's entry takes its name and about 15 bytes, so a bucket of 4,000 watches with
    names of 20 characters takes about 150 KB); None when there is nothing, or too much,
    to hand over."""
    if not handed:
        return None
    base = round(now * 1000)

    def tenths(value: float | None) -> int | None:
        # Up, never down: a floor or a plan brought forward would come too soon.
        return None if value is None else math.ceil((value * 1000 - base) / 100)

    grouped: dict[str, dict[str, list[int | None]]] = {}
    for (namespace, name), h in handed.items():
        entry = [tenths(h.last_end), tenths(h.next_poll), h.attempts]
        if h.in_flight_since is not None:
            entry.append(tenths(h.in_flight_since))
        grouped.setdefault(namespace, {})[name] = entry
    text = json.dumps({"t": base, "w": grouped}, separators=(",", ":"))
    if len(text) > MAX_HANDOVER_BYTES:
        log.warning("handover of %d watches left out: %d bytes", len(handed), len(text))
        return None
    return text


def decode_handover(body: Mapping[str, Any]) -> dict[tuple[str, str], Handed]:
    """The handover a released Lease carries; anything unreadable is left out (whoever
    may write Leases in our namespace could put anything there)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        raw = json.loads(annotations.get(HANDOVER_ANNOTATION) or "{}")
    except ValueError:
        return {}
    handed: dict[tuple[str, str], Handed] = {}
    if not isinstance(raw, dict) or not isinstance(raw.get("t"), int):
        return handed
    base = raw["t"]
    namespaces = raw.get("w")
    for namespace, names in namespaces.items() if isinstance(namespaces, dict) else ():
        for name, value in names.items() if isinstance(names, dict) else ():
            timing = _handed(base, value)
            if timing is not None and name:
                handed[(str(namespace), str(name))] = timing
    return handed


def _handed(base: int, value: object) -> Handed | None:
    if not isinstance(value, list) or len(value) not in (3, 4):
        return None
    last_end, next_poll, attempts, *flight = value
    times = (last_end, next_poll, *flight)
    if not all(v is None or (isinstance(v, int) and abs(v) < 2**40) for v in times):
        return None
    if not isinstance(attempts, int) or attempts < 0:
        return None

    def seconds(v: int | None) -> float | None:
        return None if v is None else (base + v * 100) / 1000

    return Handed(
        seconds(last_end), seconds(next_poll), attempts, seconds(flight[0]) if flight else None
    )
