"""Leases as data: the bucket of a JobWatch, the names of the Leases."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest

from jobwatch.control.sharding.leases import LeaseSettings, bucket_of

BUCKETS = 32


def test_buckets_are_stable_and_even() -> None:
    assert bucket_of("team-a", "report-42", BUCKETS) == zlib.crc32(b"team-a/report-42") % 32
    counts = Counter(bucket_of("ns", f"w{n}", BUCKETS) for n in range(10_000))
    assert len(counts) == BUCKETS
    assert max(counts.values()) < 1.25 * 10_000 / BUCKETS
    assert min(counts.values()) > 0.75 * 10_000 / BUCKETS


@pytest.mark.parametrize("identity", ["pod-7f9c_ab12", "UPPER.case", "---"])
def test_member_lease_names_are_valid(identity: str) -> None:
    name = LeaseSettings(namespace="ops", identity=identity).member_lease
    assert name.startswith("jobwatch-member-")
    assert all((c.isalnum() and c.islower()) or c.isdigit() or c == "-" for c in name)
