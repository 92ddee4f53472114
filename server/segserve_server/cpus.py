"""How many CPU cores this process can really use: its affinity, capped by a container's quota.

In a pod limited to 2 CPUs on a 64-core node, os.cpu_count() says 64; sizing thread pools and
ONNX Runtime lanes by it would mean 64 threads throttled onto 2 cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "available_cpus", "cgroup_cpu_quota"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU limit of this cgroup, rounded up (cgroup v2 cpu.max, or v1 cfs quota); None if unset."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
        if int(quota) <= 0:
            return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    return min(count, quota) if quota else count
