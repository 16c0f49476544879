"""Memory of this process: how much it may still use (the smaller of the machine's and its cgroup's room),
and the one peak-RSS probe (`peak_rss_mb`, `maxrss_mb`) that the CLI, streaming and the benchmarks report."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

__all__ = ["available_memory_bytes", "maxrss_mb", "peak_rss_mb"]


_NO_LIMIT = 1 << 60
# (mount, limit file, usage file) of cgroup v2 and v1
_CGROUPS = (
    (Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
    (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
)


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1), if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers not in ("", "memory"):
            continue
        for mount, limit_name, usage_name in _CGROUPS:
            # Inside a container the mount may already be the process's own group.
            for group in (mount / rel.lstrip("/"), mount):
                with contextlib.suppress(OSError, ValueError):
                    limit = (group / limit_name).read_text().strip()
                    if limit != "max" and int(limit) < _NO_LIMIT:
                        rooms.append(max(0, int(limit) - int((group / usage_name).read_text())))
                    break
    return min(rooms) if rooms else None


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo, capped by a cgroup memory limit."""
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    room = _cgroup_room()
    return free if room is None else min(free, room)


def maxrss_mb(*usages: resource.struct_rusage) -> float:
    """The largest `ru_maxrss` of these rusage records (a `getrusage` or an `os.wait4` result) in MiB,
    to 0.1 (Linux counts it in KiB)."""
    return round(max(usage.ru_maxrss for usage in usages) / 1024, 1)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF))
