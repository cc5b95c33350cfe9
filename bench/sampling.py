"""Sampling a process: Prometheus metrics scraped, CPU seconds of a process and of the host.

Bench kit (no jobwatch layer), shared by the harnesses in bench/.
"""

from __future__ import annotations

import aiohttp
import psutil

import benchstats as st


async def scrape(session: aiohttp.ClientSession, url: str) -> st.Samples | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
            return st.parse_prometheus(await response.text())
    except (aiohttp.ClientError, TimeoutError):
        return None


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total_s = sum(times)
    return total_s - idle, total_s
