"""What this process may use of the machine: memory and CPUs, seen through cgroups.

`psutil.virtual_memory()` reports the host. Under SLURM, Docker or Kubernetes the limit that matters is the memory
cgroup's: v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`) or v2 (`memory.max`, `memory.current`). Page cache
counts in a cgroup's usage but the kernel reclaims it before it OOM-kills, so inactive file pages are not counted as
used. The cgroup root can be redirected with NNRESUME_CGROUP_ROOT for tests.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


@dataclass(frozen=True)
class CgroupMemory:
    version: int
    path: Path
    limit: Optional[int]  # None: no limit at this level
    usage: int
    inactive_file: int

    @property
    def available(self) -> Optional[int]:
        if self.limit is None:
            return None
        return max(0, self.limit - max(0, self.usage - self.inactive_file))


def _cgroup_root() -> Path:
    return Path(os.environ.get("NNRESUME_CGROUP_ROOT", "/sys/fs/cgroup"))


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _stat_value(path: Path, *keys: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in keys:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def memory_cgroup_path(pid: int | str = "self") -> tuple[int, Path] | None:
    """(version, folder) of the memory cgroup of `pid`, or None outside any."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = _cgroup_root()
    v2 = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            path = root / "memory" / rel.lstrip("/")
            if path.is_dir():
                return 1, path
        if controllers == "":
            v2 = root / rel.lstrip("/")
    if v2 is not None and (v2 / "memory.current").exists():
        return 2, v2
    return None


def read_cgroup_memory(pid: int | str = "self") -> CgroupMemory | None:
    """The tightest memory cgroup limit on the path from `pid`'s cgroup up to the root, with that level's usage."""
    found = memory_cgroup_path(pid)
    if found is None:
        return None
    version, path = found
    root = _cgroup_root() / ("memory" if version == 1 else "")
    best: CgroupMemory | None = None
    level = path
    while True:
        if version == 1:
            limit = _read_int(level / "memory.limit_in_bytes")
            usage = _read_int(level / "memory.usage_in_bytes") or 0
            inactive = _stat_value(level / "memory.stat", "total_inactive_file")
        else:
            limit = _read_int(level / "memory.max")
            usage = _read_int(level / "memory.current") or 0
            inactive = _stat_value(level / "memory.stat", "inactive_file")
        candidate = CgroupMemory(version, level, limit, usage, inactive)
        if best is None or (candidate.available is not None and
                            (best.available is None or candidate.available < best.available)):
            best = candidate
        if level == root or level.parent == level or root not in level.parents:
            break
        level = level.parent
    return best


def available_memory() -> int:
    """Memory that can still be allocated before something is killed: host and cgroup, whichever is less."""
    host = psutil.virtual_memory().available
    cg = read_cgroup_memory()
    return min(host, cg.available) if cg is not None and cg.available is not None else host


def cgroup_is_tighter() -> bool:
    """Whether a memory cgroup, not the host, bounds what this process tree can still allocate."""
    cg = read_cgroup_memory()
    return cg is not None and cg.available is not None and cg.available < psutil.virtual_memory().available


def memory_limit() -> int:
    """The most this process tree may ever hold: host total, cgroup limit and RLIMIT_RSS, whichever is least."""
    limits = [psutil.virtual_memory().total]
    cg = read_cgroup_memory()
    if cg is not None and cg.limit is not None:
        limits.append(cg.limit)
    soft, _ = resource.getrlimit(resource.RLIMIT_RSS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
        limits.append(soft)
    return min(limits)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (SLURM's cpuset) and any cgroup CPU quota (Docker --cpus)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    root = _cgroup_root()
    quota = None
    try:
        v2 = (root / "cpu.max").read_text().split()
        if v2[0] != "max":
            quota = int(v2[0]) / int(v2[1])
    except (OSError, IndexError, ValueError):
        q, p = _read_int(root / "cpu" / "cpu.cfs_quota_us"), _read_int(root / "cpu" / "cpu.cfs_period_us")
        if q and p and q > 0:
            quota = q / p
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)
