"""The elector's planning (layer: control, sharding; pure): from one listing of the
group's Leases, the buckets to take and to give back (shares, orphan rounds, the give
rule), and whether the settings in force are this replica's.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from jobwatch.control.sharding.handed import Handed, decode_handover
from jobwatch.control.sharding.leases import BUCKET, MEMBER, LeaseSettings, Seen

# Buckets given back per round while holding more than the share: one keeps a
# rebalance gentle (each handover costs a status flush and a list on the taker).
RELEASES_PER_ROUND = 1
# A bucket free for this many retry periods is taken by anyone, beyond its share too:
# replicas short of their share would have taken it by then (a replica that died, or
# the member Leases of those that did, still count in the shares for a lease duration).
ORPHAN_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round does about the buckets (besides renewing those held)."""

    take: tuple[int, ...]
    give: tuple[int, ...]
    share: int
    live: int


def plan(
    settings: LeaseSettings,
    *,
    seen: Mapping[str, Seen],
    absent: Mapping[int, float],
    held: frozenset[int],
    now: float,
    rand: random.Random,
) -> Plan:
    """The buckets to try to take and to give back: pure, from one listing. `absent`:
    buckets without a Lease yet, and since when this replica has seen them so."""
    me = settings.identity
    mine = settings.agreement
    members = {
        lease.holder
        for lease in seen.values()
        if lease.role == MEMBER
        and lease.holder
        and not lease.expired(now)
        # One that disagrees takes nothing: sharing with it would leave buckets unheld.
        and lease.agreement in (None, mine)
    }
    members.add(me)
    live = len(members)
    share = math.ceil(settings.buckets / live)
    floor = settings.buckets // live
    counts = dict.fromkeys(members, 0)
    free: list[tuple[int, float]] = []
    ours: list[int] = []
    for bucket in range(settings.buckets):
        lease = seen.get(settings.bucket_lease(bucket))
        if lease is None:
            free.append((bucket, absent.get(bucket, now)))
            continue
        if lease.holder == me and bucket not in held:
            # Ours on record but not in use (parked after an outage, or a taking whose
            # answer was lost): nobody else may take it before it expires, so it is
            # taken back whatever the share (a rebalance gives back any excess).
            ours.append(bucket)
            continue
        since = lease.free_since(now)
        if since is not None:
            if bucket not in held:
                free.append((bucket, since))
        elif lease.holder in counts:
            counts[lease.holder] += 1
    counts[me] = len(held)
    take = list(ours)
    if free:
        rand.shuffle(free)  # replicas starting together then rarely want the same one
        want = share - len(held) - len(ours)
        for bucket, since in free:
            # Beyond the share: only what nobody else took for a few rounds (whoever is
            # short of its share takes such a bucket at its next round).
            if want > 0 or now - since >= ORPHAN_ROUNDS * settings.retry_period:
                take.append(bucket)
                want -= 1
    return Plan(tuple(take), to_give(me, held, counts, floor, share), share, live)


def to_give(
    me: str, held: frozenset[int], counts: Mapping[str, int], floor: int, share: int
) -> tuple[int, ...]:
    """One bucket back this round if this replica holds more than the share, or if
    another holds fewer than the floor and this one is among the fullest that together
    make up that shortfall (ties by name): every replica decides alike from the same
    listing, so about as many move as must. (Giving only above the share left 32 buckets
    over 5 replicas at 7, 7, 7, 7 and 4 for good; giving only to one below the floor left
    them over 3 replicas at 12, 10 and 10.)"""
    if len(held) > share:
        return tuple(sorted(held, reverse=True)[:RELEASES_PER_ROUND])
    short = sum(floor - n for m, n in counts.items() if m != me and n < floor)
    if not short or len(held) <= floor:
        return ()
    fullest = sorted((m for m, n in counts.items() if n > floor), key=lambda m: (-counts[m], m))
    if me not in fullest[:short]:
        return ()
    return tuple(sorted(held, reverse=True)[:RELEASES_PER_ROUND])


def in_force(seen: Mapping[str, Seen], now: float) -> tuple[str, str] | None:
    """The settings in force in the group, those on the most live bucket Leases (ties go
    to the same value everywhere), and a replica that holds a bucket under them; None
    while no live bucket Lease says."""
    counts: Counter[str] = Counter()
    holders: dict[str, str] = {}
    for lease in seen.values():
        if lease.role == BUCKET and lease.agreement and not lease.expired(now):
            counts[lease.agreement] += 1
            holders.setdefault(lease.agreement, lease.holder)
    if not counts:
        return None
    text = max(counts, key=lambda text: (counts[text], text))
    return text, holders[text]


def disagreement(settings: LeaseSettings, holder: str, in_force: str) -> str:
    """The log line and /healthz text: which setting differs, and what to do."""
    try:
        theirs = {str(k): str(v) for k, v in json.loads(in_force).items()}
    except (ValueError, AttributeError):
        theirs = {}
    mine = json.loads(settings.agreement)
    differ = [
        key for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key)
    ]
    what = ", ".join(f"{key}={theirs.get(key, '?')!r}" for key in differ)
    here = ", ".join(f"{key}={mine.get(key, '?')!r}" for key in differ)
    return (
        f"lease group {settings.group}: replica {holder} runs with {what}, this one with "
        f"{here}; this replica takes no bucket until they agree (docs/operations.md, "
        '"Changing the bucket count")'
    )


def until_expiry(seen: Mapping[str, Seen], me: str, now: float) -> float:
    """Seconds until another replica's bucket Lease expires, as seen here: the next
    round then comes right after, not up to a retry period later (a dead replica's
    watches wait that much less)."""
    ends = [
        end
        for lease in seen.values()
        if lease.role == BUCKET
        and lease.holder not in ("", me)
        and (end := lease.since + lease.duration) > now  # expired ones: taken or not
    ]
    return min(ends, default=math.inf) - now


def foreign_handovers(seen: Mapping[str, Seen], mine: str) -> dict[tuple[str, str], Handed]:
    """The handovers on bucket Leases released under other settings than `mine`. After
    a change of the settings in force (a new bucket count, say) they belong to watches
    that may now be in any bucket, taken in any order, so all of them are read before
    the first taking, not each with the Lease of the same name."""
    handed: dict[tuple[str, str], Handed] = {}
    for lease in seen.values():
        if lease.role == BUCKET and not lease.holder and lease.agreement not in (None, mine):
            handed.update(decode_handover(lease.body))
    return handed
