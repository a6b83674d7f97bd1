"""What a task's end means: a result committed and its peak learned, a failure recorded, a death retried with more
room or quarantined, a case alone over the budget quarantined; every attempt recorded in the ledger.

The runner (runner.py) admits a stage's tasks and collects their events. For each task it hands what the worker sent
(`received`) and how the task ended (`ended`) to the stage's `StageOutcomes`, which tells the stage's handler
(`StageHandler`: committing a result, recording a failure), the scheduler (retry with fewer cases beside it, or give
up) and the progress bar, and counts the stage's `StageStats`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from ..config import format_bytes
from ..ledger.models import TaskState
from ..ledger.repository import AttemptRecord
from ..tasks import Death, FingerprintResult, OutputResult, TaskFailed, TaskFinished
from .memory import Estimator
from .pools.base import Pool, describe_signal
from .scheduler import QueueItem, Scheduler

log = logging.getLogger(__name__)


def suggest_budget(seen: int) -> str:
    """A --max-ram that leaves a quarter more than what was seen, in whole GiB."""
    return f"{-(-int(seen * 1.25) // 2**30)}G"


class StageHandler(Protocol):
    stage: str

    def build(self, item: QueueItem, attempt: int) -> Any: ...
    def started(self, item: QueueItem) -> None: ...
    def received(self, item: QueueItem, message: Any) -> None: ...
    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None: ...
    def remaining_units(self, item: QueueItem) -> dict[str, int]: ...


@dataclass
class RunningTask:
    """A task the runner started (or queued in the pool), and what is known of it so far."""

    item: QueueItem
    task: Any
    started: float
    wall_started: float
    alone: bool
    memory: int = 0
    peak_memory: int = 0
    failure: Optional[TaskFailed] = None
    peak_rss: Optional[int] = None
    private_peak: Optional[int] = None
    stop_requested: bool = False
    over_budget: Optional[int] = None  # the tree's memory when the governor stopped it for good, alone over budget
    queued: bool = False  # held by the pool until a running task ends (Pool.enqueue); not started yet
    cancelled: bool = False  # taken back from the pool's queue


@dataclass
class StageStats:
    done: int = 0
    failed: int = 0
    quarantined: int = 0
    retried: int = 0
    stopped: int = 0
    peak_tree: int = 0
    halted: Optional[str] = None
    messages: list[str] = field(default_factory=list)


@dataclass
class StageOutcomes:
    """The ends of one stage's tasks: what each means, for the stage's handler, the scheduler and the stats."""

    scheduler: Scheduler
    handler: StageHandler
    stats: StageStats
    pool: Pool
    estimator: Estimator
    budget: int
    run_id: int
    record_attempt: Callable[[AttemptRecord], None]
    progress: Any = None

    def received(self, r: RunningTask, message: Any) -> None:
        if not isinstance(message, (TaskFailed, TaskFinished)):  # a result: the handler commits it
            self.handler.received(r.item, message)
            peak = getattr(message, "peak_rss", None)
            if peak is not None:
                r.peak_rss = max(r.peak_rss or 0, peak)
                private = self.pool.private_peak(r.item.task_id, peak)
                r.private_peak = max(r.private_peak or 0, private)
                key, units = self._units_of(r.item, message)
                if key:
                    self.estimator.observe(key, units, private - r.item.fixed)
        elif isinstance(message, TaskFailed):
            r.failure = message
        elif isinstance(message, TaskFinished):
            if message.peak_rss:
                r.peak_rss = max(r.peak_rss or 0, message.peak_rss)

    @staticmethod
    def _units_of(item: QueueItem, message: Any) -> tuple[Optional[str], int]:
        """Which estimate a result's peak teaches, and the size it was for."""
        if isinstance(message, FingerprintResult):
            return ("fingerprint", item.units.get("fingerprint", 0)) if not message.unchanged else (None, 0)
        if isinstance(message, OutputResult):
            key = f"preprocess:{message.target.data_identifier}"
            return (key, item.units.get(key, 0)) if key in item.units else (None, 0)
        return (None, 0)

    def _record(self, r: RunningTask, outcome: str, death: Optional[Death], message: Optional[str]) -> None:
        self.record_attempt(AttemptRecord(
            run_id=self.run_id, case_name=r.item.case, stage=getattr(r.task, "stage", "?"),
            targets=list(getattr(r.task, "targets", [])), started_at=r.wall_started, ended_at=time.time(),
            outcome=outcome, exit_code=death.exit_code if death else 0, signal=death.signal if death else None,
            peak_rss=r.peak_rss, last_rss=r.memory or None, estimate_bytes=r.item.estimate,
            budget_bytes=self.budget, message=message, private_peak=r.private_peak))

    def ended(self, r: RunningTask, death: Optional[Death], stopping: bool) -> None:
        item, handler, stats = r.item, self.handler, self.stats
        if death is None and r.failure is None:
            stats.done += 1
            self._record(r, "ok", None, None)
            if self.progress is not None:
                self.progress.case_done()
            return
        if death is None and r.failure is not None:
            f = r.failure
            if f.kind == "memory":
                self._died(r, f.message, None)
                return
            handler.ended_badly(item, TaskState.failed, f.message, died=False, peak=r.peak_rss)
            stats.failed += 1
            if self.progress is not None:
                self.progress.case_failed()
            stats.messages.append(f.message)
            self._record(r, "error", None, f.message)
            log.error("%s", f.message)
            if f.traceback:
                log.debug("%s", f.traceback)
            if f.kind == "disk":
                stats.halted = f"{f.message}; free some space and run the same command again"
            return
        assert death is not None
        if death.killed_by_us:
            if stopping:
                handler.ended_badly(item, TaskState.pending, "stopped at shutdown", died=False, peak=r.peak_rss)
                self._record(r, "stopped", death, "stopped at shutdown")
                return
            if r.over_budget is not None:
                self._over_budget(r)
                return
            stats.stopped += 1
            self._record(r, "stopped", death, "stopped by the memory governor")
            handler.ended_badly(item, TaskState.pending, "stopped by the memory governor", died=False,
                                peak=r.peak_rss)
            item.units = handler.remaining_units(item)
            self.scheduler.stopped(item, r.peak_memory)
            return
        how = death.extra.get("how") or (f"killed by {describe_signal(death.signal)}" if death.signal
                                         else f"exited with code {death.exit_code} without reporting")
        self._died(r, how, death)

    def _over_budget(self, r: RunningTask) -> None:
        """A case alone past the budget: more room is not to be had here, so it is quarantined at once."""
        seen = r.over_budget or 0
        message = (f"case {r.item.case} ({self.handler.stage}): stopped at {format_bytes(seen)} of process tree "
                   f"memory, over the budget {format_bytes(self.budget)} although it ran alone; quarantined")
        hint = (f"on a machine with more memory, run the same command with --retry-quarantined --max-ram "
                f"{suggest_budget(seen)} (or --allow-oversize to let cases alone pass the budget)")
        self._record(r, "stopped", None, f"{message} ({hint})")
        self.handler.ended_badly(r.item, TaskState.quarantined, f"{message} ({hint})", died=False, peak=r.peak_rss)
        self.stats.quarantined += 1
        if self.progress is not None:
            self.progress.case_failed()
        self.stats.messages.append(message)
        log.error("%s\n  hint: %s", message, hint)

    def _died(self, r: RunningTask, how: str, death: Optional[Death]) -> None:
        item, handler, scheduler, stats = r.item, self.handler, self.scheduler, self.stats
        likely = " (the out-of-memory killer, or a kill -9)" if death and death.signal == 9 else ""
        seen = f" at {format_bytes(r.peak_memory)} private memory" if r.peak_memory else ""
        detail = f"{how}{likely}{seen}; estimate {format_bytes(item.estimate)}, budget {format_bytes(self.budget)}"
        self._record(r, "died", death, detail)
        item.units = handler.remaining_units(item)
        if scheduler.died(item, r.peak_memory, how):
            stats.retried += 1
            handler.ended_badly(item, TaskState.pending, f"worker {detail}; retrying", died=True, peak=r.peak_rss)
            alone = (" alone" if item.max_concurrency == 1 else " with fewer cases beside it"
                     if item.max_concurrency < scheduler.max_workers else "")
            log.warning("case %s (%s): worker %s; retrying%s (death %d of %d)", item.case, handler.stage, detail,
                        alone, item.deaths, scheduler.max_deaths)
        else:
            message = f"case {item.case}: quarantined after {item.deaths} worker deaths; last: worker {detail}"
            handler.ended_badly(item, TaskState.quarantined, message, died=True, peak=r.peak_rss)
            stats.quarantined += 1
            if self.progress is not None:
                self.progress.case_failed()
            stats.messages.append(message)
            log.error("%s", message)
