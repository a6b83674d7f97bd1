"""How the local pool counts memory: each page once, a companion's memory beyond its idle size as the task it serves.

Memory readings are injected (as in test_governor.py); the companion's messages travel through a real pipe.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Optional

from nnresume.execution.memory import MIB, TreeSampler
from nnresume.execution.pools.local import LocalPool, _Companion, _Worker

ORCHESTRATOR, FORKSERVER, WORKER, IDLE_WORKER, DEVICE = os.getpid(), 101, 102, 103, 104


@dataclass
class _Process:
    pid: int
    exitcode: Optional[int] = None


@dataclass
class _Task:
    task_id: str


class _Memory:
    """RSS and USS per pid, changed by the test between readings."""

    def __init__(self) -> None:
        self.rss = {ORCHESTRATOR: 170 * MIB, FORKSERVER: 470 * MIB, WORKER: 350 * MIB, IDLE_WORKER: 350 * MIB,
                    DEVICE: 500 * MIB}
        self.uss = {ORCHESTRATOR: 90 * MIB, FORKSERVER: 80 * MIB, WORKER: 30 * MIB, IDLE_WORKER: 40 * MIB,
                    DEVICE: 120 * MIB}

    def grow(self, pid: int, by: int) -> None:
        self.rss[pid] += by
        self.uss[pid] += by


def _pool(memory: _Memory) -> tuple[LocalPool, Any]:
    sampler = TreeSampler(full_interval=0.0, read_rss=memory.rss.get, read_uss=memory.uss.get,
                          read_available=lambda: 8 << 30)
    pool = LocalPool(sampler=sampler)
    pool.forkserver_pid = lambda: FORKSERVER  # type: ignore[method-assign]
    pool._workers = [_Worker(_Process(WORKER), None, task=_Task("case-a")), _Worker(_Process(IDLE_WORKER), None)]
    ours, theirs = multiprocessing.Pipe(duplex=True)
    pool._companions = [_Companion(_Process(DEVICE), ours, None)]
    return pool, theirs


def test_each_page_counted_once_and_the_orchestrator_by_its_private_memory() -> None:
    pool, _ = _pool(_Memory())
    r = pool.readings()
    # the forkserver's RSS; the orchestrator's, the idle worker's and the idle device's private memory
    assert r.overhead == (470 + 90 + 40 + 120) * MIB
    assert r.per_task == {"case-a": 30 * MIB}
    assert r.tree == r.overhead + 30 * MIB


def test_a_companion_serving_a_task_counts_its_growth_as_that_tasks() -> None:
    memory = _Memory()
    pool, device = _pool(memory)
    pool.readings()  # idle: its size is learned
    device.send(("serving", "case-a"))
    memory.grow(DEVICE, 300 * MIB)
    r = pool.readings()
    assert r.per_task["case-a"] == (30 + 300) * MIB
    assert r.overhead == (470 + 90 + 40 + 120) * MIB
    assert r.tree == r.overhead + 330 * MIB

    device.send(("served", "case-a", 320 * MIB))
    memory.grow(DEVICE, -300 * MIB)
    r = pool.readings()
    assert r.per_task["case-a"] == 30 * MIB
    # the task's peak: its worker's private peak and the device's peak above its idle size while serving it
    assert pool.private_peak("case-a", 360 * MIB) == 360 * MIB - (350 - 30) * MIB + 320 * MIB
    assert pool.private_peak("case-a", 360 * MIB) == 360 * MIB - (350 - 30) * MIB  # counted once


def test_a_companion_serving_a_task_that_is_not_running_counts_as_overhead() -> None:
    memory = _Memory()
    pool, device = _pool(memory)
    pool.readings()
    device.send(("serving", "case-gone"))
    memory.grow(DEVICE, 200 * MIB)
    r = pool.readings()
    assert r.per_task == {"case-a": 30 * MIB}
    assert r.overhead == (470 + 90 + 40 + 320) * MIB
