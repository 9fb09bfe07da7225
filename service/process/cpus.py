"""How many CPUs this process may really use, and so how many workers to fork.

`os.cpu_count()` reports the machine's cores, not the container's share: a pod limited to 1.5
CPUs on a 64-core node would fork 64 workers that fight over 1.5 cores. The budget is the
smallest of the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`,
anywhere up the process's cgroup path), the CPU affinity mask and the core count, rounded up
(1.5 CPUs run two workers that each get three quarters of a core) and at least 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from service.process.cgroup import CGROUP_ROOT, SELF_CGROUP, controller_paths, read, up_from


@dataclass(frozen=True)
class CpuBudget:
    """The worker count and every figure it was derived from, so the start-up log can say why."""

    workers: int
    reason: str
    cores: int | None
    affinity: int | None
    quota: float | None


def _ratio(quota_text: str | None, period_text: str | None) -> float | None:
    """quota/period in CPUs; None for "max", -1, or anything unreadable (no limit known)."""
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(directory: Path) -> float | None:
    fields = (read(directory / "cpu.max") or "").split()
    return _ratio(*fields) if len(fields) == 2 else None


def _v1_quota(directory: Path) -> float | None:
    return _ratio(read(directory / "cpu.cfs_quota_us"), read(directory / "cpu.cfs_period_us"))


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> tuple[float, str] | None:
    """The tightest CPU quota on this process's cgroup path as (CPUs, where it was found), or None."""
    paths = controller_paths(self_cgroup)
    found: list[tuple[float, str]] = []
    if "" in paths:  # cgroup v2 (unified) or the v2 part of a hybrid host
        for directory in up_from(root, paths[""]):
            quota = _v2_quota(directory)
            if quota is not None:
                found.append((quota, f"cgroup v2 {directory / 'cpu.max'}"))
    if "cpu" in paths:  # cgroup v1: the cpu controller is mounted as cpu, or cpu,cpuacct
        for mount_name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = root / mount_name
            if not mount.is_dir():
                continue
            for directory in up_from(mount, paths["cpu"]):
                quota = _v1_quota(directory)
                if quota is not None:
                    found.append((quota, f"cgroup v1 {directory / 'cpu.cfs_quota_us'}"))
            break
    return min(found) if found else None


def affinity_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def cpu_budget(
    root: Path = CGROUP_ROOT,
    self_cgroup: Path = SELF_CGROUP,
    cores: int | None = None,
    affinity: int | None = None,
) -> CpuBudget:
    """Workers to fork when WEB_CONCURRENCY is not set: the CPUs this process may really use."""
    cores = os.cpu_count() if cores is None else cores
    affinity = affinity_count() if affinity is None else affinity
    quota = cgroup_quota(root, self_cgroup)
    limits: list[tuple[float, str]] = []
    if cores:
        limits.append((float(cores), f"{cores} cores"))
    if affinity:
        limits.append((float(affinity), f"CPU affinity allows {affinity}"))
    if quota is not None:
        limits.append((quota[0], f"{quota[1]} allows {quota[0]:g} CPUs"))
    if not limits:
        return CpuBudget(1, "no CPU information found; 1 worker", cores, affinity, None)
    value, why = min(limits)
    workers = max(1, math.ceil(value))
    return CpuBudget(workers, why, cores, affinity, quota[0] if quota else None)
