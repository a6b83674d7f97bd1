"""The memory governor: how much the process tree holds, how much a case will need, and whether to start or stop one.

What it covers
- `TreeSampler` reads the memory of the orchestrator, the forkserver and every worker a few times a second. Workers
  are forked from a forkserver that holds nnunetv2, so most of a fresh worker's RSS (about 240 MB) is pages shared
  with the forkserver; summing RSS would count them once per worker. The sampler counts each page once: the
  forkserver's RSS, plus the private memory (USS) of every other process (the pool says which; the orchestrator's
  shared pages are libraries the forkserver maps too, or processes outside the run). USS is costly to read (~2 ms per
  process, from smaps), so it is read every couple of seconds and carried forward between reads by the change in RSS,
  which is cheap (~10 us) and tracks new allocations exactly.
- `Estimator` predicts a task's peak from its image header (voxels, channels, spacing against the configuration's
  target spacing) with bytes-per-voxel coefficients that start from priors and are replaced by what finished cases
  of the same stage and configuration actually used.
- `decide()` is a pure function of readings and state, as dask's worker memory manager is, so admission, the
  throttle and the stop of the newest case are tested with injected readings (tests/test_governor.py).

What it does not cover: killing processes (the runner does, on its decision), retry and quarantine (scheduler.py),
reading cgroup limits (system.py).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import psutil

from .. import geometry
from . import system

MIB = 1 << 20
GIB = 1 << 30

# Bytes of peak memory per (voxel x channel), before any case has been measured. Measured on nnunetv2 2.8.1:
# fingerprint ~13-18 (float32 image + label + crop), preprocessing with resampling ~30-45 per voxel of
# (input + output) grid; the priors err high, and the first measured case replaces them.
PRIORS = {"fingerprint": 24.0, "preprocess": 48.0, "gt": 0.0}
SAFETY = 1.15  # learned coefficients are the largest observed ratio times this
WORKER_BASE = 64 * MIB  # private memory of a worker before it reads anything, generous


@dataclass(frozen=True)
class Thresholds:
    """Named fractions and margins, as dask names its target/spill/pause/terminate fractions."""

    reserve: int = 512 * MIB  # free memory (cgroup-aware) below which no case starts
    stop_fraction: float = 0.95  # tree memory above this fraction of the budget: stop the newest case
    critical_free: float = 0.5  # free memory below this fraction of the reserve: stop the newest case
    allow_oversize: bool = False  # --allow-oversize: a case alone may go past the budget


DEFAULT_THRESHOLDS = Thresholds()


def default_budget(available: int, own_cgroup: bool = False) -> int:
    """Without --max-ram: what is available now, minus a reserve of 10%, at most 4 GiB. On a machine others share
    the reserve is at least 1 GiB; when the tighter limit is a memory cgroup of the job's own (a SLURM job's
    `--mem`, a container's `-m`), nothing but the job lives in it and its page cache is reclaimed before anything is
    killed, so 10% is kept (a 1 GiB reserve was half of a 2 GiB job and left a predicting worker no room)."""
    reserve = min(4 * GIB, available // 10 if own_cgroup else max(GIB, available // 10))
    return max(available - reserve, available // 2)


def resolve_budget(max_bytes: Optional[int], fraction: Optional[float], available: int,
                   own_cgroup: bool = False) -> int:
    if max_bytes is not None:
        return max_bytes
    if fraction is not None:
        return int(available * fraction)
    return default_budget(available, own_cgroup)


# ---- readings --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Readings:
    tree: int  # orchestrator + forkserver + workers, each page counted once
    overhead: int  # orchestrator + forkserver
    available: int  # what the host and the cgroup can still give
    per_task: dict[str, int] = field(default_factory=dict)  # task id -> worker memory (private)


@dataclass
class _WorkerMemory:
    uss: int = 0
    rss_at_full: int = 0
    full_at: float = -math.inf


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss(pid: int) -> Optional[int]:
    # /proc/<pid>/statm is what psutil reads for the RSS on Linux, without building a Process (which reads
    # /proc/<pid>/stat as well): a third of the cost, and the runner reads it after every task
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # the process is gone
    except (OSError, ValueError, IndexError):
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _uss(pid: int) -> Optional[int]:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class TreeSampler:
    def __init__(self, full_interval: float = 2.0,
                 read_rss: Callable[[int], Optional[int]] = _rss,
                 read_uss: Callable[[int], Optional[int]] = _uss,
                 read_available: Callable[[], int] = system.available_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.full_interval = full_interval
        self._rss, self._uss, self._available, self._clock = read_rss, read_uss, read_available, clock
        self._workers: dict[int, _WorkerMemory] = {}
        self.shared: dict[int, int] = {}  # pid -> RSS - USS at the last full read

    def sample(self, overhead_pids: Iterable[int], workers: dict[str, int]) -> Readings:
        now = self._clock()
        overhead = sum(r for r in (self._rss(p) for p in overhead_pids) if r)
        per_task = {}
        for task_id, pid in workers.items():
            rss = self._rss(pid)
            if rss is None:
                continue
            state = self._workers.setdefault(pid, _WorkerMemory())
            if now - state.full_at >= self.full_interval:
                uss = self._uss(pid)
                if uss is not None:
                    state.uss, state.rss_at_full, state.full_at = uss, rss, now
                    self.shared[pid] = max(0, rss - uss)
            per_task[task_id] = max(0, state.uss + rss - state.rss_at_full)
        for pid in set(self._workers) - set(workers.values()):
            del self._workers[pid]
            self.shared.pop(pid, None)
        return Readings(tree=overhead + sum(per_task.values()), overhead=overhead, available=self._available(),
                        per_task=per_task)

    def private_of(self, pid: int) -> Optional[int]:
        """A process's private memory now: its RSS less what it shared at the last full read (cheap), or a full
        read if there was none. None when the process is gone."""
        rss = self._rss(pid)
        if rss is None:
            return None
        if pid not in self.shared:
            uss = self._uss(pid)
            if uss is None:
                return None
            self.shared[pid] = max(0, rss - uss)
        return max(0, rss - self.shared[pid])

    def shared_of(self, pid: int) -> int:
        """Pages `pid` shares with the forkserver; read now if no full read of it was made yet (a task that
        finished between two samples)."""
        if pid not in self.shared:
            rss, uss = self._rss(pid), self._uss(pid)
            if rss is not None and uss is not None:
                self.shared[pid] = max(0, rss - uss)
        return self.shared.get(pid, 0)


# ---- estimates -------------------------------------------------------------------------------------------------

def voxels(shape: Iterable[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def resampled_voxels(shape: list[int], spacing: list[float], target_spacing: list[float],
                     transpose_forward: list[int]) -> int:
    """Voxels after resampling to `target_spacing` (given in transposed order, 2 entries for 2d).

    `shape` and `spacing` are a case as nnU-Net's reader returns it: three axes, 2D images as (1, h, w).
    """
    spacing_t = [spacing[i] for i in transpose_forward]
    if len(target_spacing) < len(spacing_t):
        target_spacing = [spacing_t[0], *target_spacing]
    factor = math.prod(s / t for s, t in zip(spacing_t, target_spacing) if t > 0)
    return int(voxels(shape) * factor)


# Values per byte of file when a header cannot be read: compressed images hold several times their size.
UNREADABLE_HEADER_EXPANSION = 8


def _file_size_units(images: list[str]) -> int:
    total = 0
    for p in images:
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return max(1, UNREADABLE_HEADER_EXPANSION * total)


def fingerprint_units(header: Optional[dict[str, Any]], images: list[str]) -> int:
    """A case's size for the fingerprint estimate: values in its first image file (any axes, any components)
    times its number of image files; from file sizes when the header could not be read."""
    n = geometry.header_voxels(header)
    return n * max(1, len(images)) if n else _file_size_units(images)


def preprocess_units(header: Optional[dict[str, Any]], images: list[str], target_spacing: Optional[list[float]],
                     transpose_forward: Optional[list[int]], reader: Optional[str]) -> int:
    """A case's size for one configuration's estimate: its channels times (voxels as read + voxels after
    resampling). Uses the shape the reader returned during the fingerprint stage when the ledger has it, else the
    header read as that reader would read it, else twice the fingerprint's size."""
    header = header or {}
    geo: Optional[geometry.Geometry] = None
    if header.get("reader_shape") and header.get("reader_spacing"):
        c, *shape = header["reader_shape"]
        if len(shape) == 3 and len(header["reader_spacing"]) == 3:
            geo = geometry.Geometry(int(c), (shape[0], shape[1], shape[2]), tuple(header["reader_spacing"]))
    if geo is None:
        one = geometry.geometry(header, reader, images[0] if images else "")
        if one is not None:
            geo = geometry.Geometry(one.channels * max(1, len(images)), one.shape, one.spacing)
    if geo is None or not target_spacing:
        return 2 * fingerprint_units(header or None, images)
    transpose = list(transpose_forward) if transpose_forward and len(transpose_forward) == 3 else [0, 1, 2]
    resampled = resampled_voxels(list(geo.shape), list(geo.spacing), list(target_spacing), transpose)
    return geo.channels * (geo.voxels + resampled)


@dataclass
class Estimator:
    """Peak memory per task from its header, learning bytes-per-unit per (stage, configuration)."""

    priors: dict[str, float] = field(default_factory=lambda: dict(PRIORS))
    base: int = WORKER_BASE
    learned: dict[str, float] = field(default_factory=dict)
    observations: dict[str, int] = field(default_factory=dict)

    def coefficient(self, key: str) -> float:
        kind = key.split(":", 1)[0]
        return self.learned.get(key, self.priors.get(kind, PRIORS["preprocess"]))

    def estimate(self, units: dict[str, int]) -> int:
        """`units` maps each target key ("fingerprint", "preprocess:<data_identifier>", "gt") to its size in
        voxel-channels. Targets of one task run one after another, so the task needs the largest of them."""
        if not units:
            return self.base
        return int(self.base + max(self.coefficient(k) * u for k, u in units.items()))

    def observe(self, key: str, units: int, peak: int) -> None:
        """Learns from a finished target: `peak` is its measured private peak memory."""
        if units <= 0 or peak <= 0:
            return
        ratio = max(0.0, (peak - self.base) / units) * SAFETY
        self.learned[key] = max(self.learned.get(key, 0.0), ratio)
        self.observations[key] = self.observations.get(key, 0) + 1

    def state(self) -> dict[str, Any]:
        return {"learned": dict(self.learned), "observations": dict(self.observations)}


# ---- the decision ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunningCase:
    task_id: str
    started: float
    estimate: int
    memory: int
    alone: bool = False


class Candidate(Protocol):
    """A waiting case as the governor sees it (the scheduler's queue items, or `Waiting`)."""

    @property
    def task_id(self) -> str: ...
    @property
    def estimate(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def blocking(self) -> bool: ...


@dataclass(frozen=True)
class Waiting:
    task_id: str
    estimate: int
    max_concurrency: int = 1 << 30  # start only if at most this many cases, itself included, would run
    blocking: bool = False  # starvation guard: nothing is started past it until it starts


@dataclass
class Decision:
    admit: list[str] = field(default_factory=list)
    alone: list[str] = field(default_factory=list)  # admitted with nothing else allowed beside them
    oversized: list[str] = field(default_factory=list)  # admitted alone although the estimate exceeds the budget
    stop: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)  # stopped for good: alone, it went past the budget
    reason: str = ""


def decide(readings: Readings, running: list[RunningCase], waiting: Sequence[Candidate], budget: int, max_workers: int,
           thresholds: Thresholds = DEFAULT_THRESHOLDS, stops_pending: int = 0) -> Decision:
    """What to start and what to stop now. `waiting` is in priority order (see scheduler.py)."""
    d = Decision()
    if stops_pending:
        d.reason = "waiting for a stopped case to exit"
        return d
    # the budget is a promise: a case running alone cannot get more room than it has, so past the budget it stops
    if len(running) == 1 and readings.tree > budget and not thresholds.allow_oversize:
        d.stop.append(running[0].task_id)
        d.over_budget.append(running[0].task_id)
        d.reason = f"memory {readings.tree} over budget {budget} with one case running"
        return d
    # throttle: the tree nears the budget, or the machine nears its limit for reasons of its own
    if len(running) > 1 and (readings.tree > thresholds.stop_fraction * budget
                             or readings.available < thresholds.critical_free * thresholds.reserve):
        newest = max(running, key=lambda r: r.started)
        d.stop.append(newest.task_id)
        d.reason = (f"memory {readings.tree} near budget {budget}" if readings.tree > thresholds.stop_fraction * budget
                    else f"free memory {readings.available} under half the reserve")
        return d
    if any(r.alone for r in running):
        d.reason = "a case that must run alone is running"
        return d
    if readings.available < thresholds.reserve and running:
        d.reason = "free memory under the reserve"
        return d
    committed = readings.overhead + sum(max(r.estimate, r.memory) for r in running)
    growth = sum(max(0, r.estimate - r.memory) for r in running)
    free_budget = budget - committed
    free_system = readings.available - thresholds.reserve - growth
    n = len(running)
    for w in waiting:
        if n >= max_workers:
            d.reason = d.reason or "all workers busy"
            break
        if w.max_concurrency < n + 1:
            if w.blocking:
                d.reason = f"{w.task_id} waits to run with fewer cases"
                break
            continue
        if w.estimate <= free_budget and w.estimate <= free_system:
            d.admit.append(w.task_id)
            if w.max_concurrency == 1:
                d.alone.append(w.task_id)
                break
            n += 1
            free_budget -= w.estimate
            free_system -= w.estimate
        elif n == 0:
            # nothing runs: this case cannot get more room than now, so it runs alone
            d.admit.append(w.task_id)
            d.alone.append(w.task_id)
            if readings.overhead + w.estimate > budget:
                d.oversized.append(w.task_id)
            break
        elif w.blocking:
            d.reason = f"{w.task_id} waits for room"
            break
        else:
            d.reason = d.reason or "waiting for memory"
    return d
