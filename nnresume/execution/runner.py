"""The loop that runs a stage's tasks: admit them by the governor's decision and collect their events.

One loop for both stages. What is stage-specific (building a task, committing a result to the ledger, recording a
failure) goes through `StageHandler`; what a task's end means (a result, a failure, a death to retry or quarantine)
is decided in outcomes.py; what is about processes and memory stays here: sampling, the governor's stops and
admissions, tasks queued in the pool ahead of time, the grace period after a signal. The loop never blocks for long:
it wakes at least five times a second to sample memory and to notice a dead worker, a signal, or a full disk.

`run_one` runs a dataset-level step (reader choice, fingerprint aggregation, planning) alone in a worker, sampled
like a case.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..config import format_bytes
from ..errors import DatasetError, Interrupted, NnresumeError, UsageError, WorkerDied
from ..ledger.models import TaskState
from ..ledger.repository import AttemptRecord, MemorySampleRecord
from ..tasks import DatasetResult, Death, TaskFailed
from .memory import DEFAULT_THRESHOLDS, Estimator, Readings, RunningCase, Thresholds, decide
from .outcomes import RunningTask, StageHandler, StageOutcomes, StageStats, suggest_budget
from .pools.base import Ended, Event, Pool, Received, Started, describe_signal
from .scheduler import QueueItem, Scheduler

log = logging.getLogger(__name__)

TICK = 0.2
SAMPLE_EVERY = 0.1  # seconds: memory is read at most this often (each reading walks every process's smaps)


class StopFlag:
    """Set by signal handlers (which do nothing else); read by the loop."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.exit_code: int = 0
        self.at: Optional[float] = None
        self.force = False  # a second signal: stop running cases now, without the grace period

    def set(self, signal_name: str, exit_code: int) -> None:
        if self.signal_name is None:
            self.signal_name, self.exit_code, self.at = signal_name, exit_code, time.monotonic()
        else:
            self.force = True

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A StopFlag that SIGINT and SIGTERM set while the block runs; their earlier handlers are put back after it."""
    stop = StopFlag()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set(signal.Signals(signum).name, 128 + signum)  # only set flags: the main loop logs and stops workers

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class _Stage:
    """One stage's loop state."""

    scheduler: Scheduler
    handler: StageHandler
    outcomes: StageOutcomes
    running: dict[str, RunningTask] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    stops_pending: int = 0
    grace_deadline: Optional[float] = None


class Runner:
    """Runs a stage's queue through a pool (pools/base.py), or one dataset-level task, with memory governed."""

    def __init__(self, pool: Pool, budget: int, max_workers: int, estimator: Estimator, run_id: int,
                 record_attempt: Callable[[AttemptRecord], None],
                 record_samples: Callable[[list[MemorySampleRecord]], None],
                 stop: StopFlag, grace_seconds: float, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                 progress: Any = None, tick: Optional[Callable[[], None]] = None,
                 sample_every: float = SAMPLE_EVERY, held: Optional[Callable[[], int]] = None) -> None:
        self.pool, self.budget, self.max_workers, self.estimator = pool, budget, max_workers, estimator
        self.run_id, self.record_attempt, self.record_samples = run_id, record_attempt, record_samples
        self.stop, self.grace, self.thresholds = stop, grace_seconds, thresholds
        self.progress, self.tick, self.sample_every = progress, tick, sample_every
        # memory the run holds outside its processes (the read cache in RAM), counted with the tree's overhead
        self.held = held
        self.peak_tree = 0
        self._t0 = time.monotonic()
        self._samples: list[MemorySampleRecord] = []
        self._last_kept = -1.0
        self._last_flush = time.monotonic()
        self._last_sample = 0.0
        self.readings: Optional[Readings] = None

    # ---- memory -----------------------------------------------------------------------------------------------

    def _sample(self, running: dict[str, RunningTask]) -> Readings:
        now = time.monotonic()
        if self.readings is not None and now - self._last_sample < self.sample_every:
            return self.readings  # events arrive far faster than memory changes when cases are small
        self._last_sample = now
        readings = self.pool.readings()
        held = self.held() if self.held else 0
        if held:
            readings = replace(readings, tree=readings.tree + held, overhead=readings.overhead + held)
        for task_id, mem in readings.per_task.items():
            r = running.get(task_id)
            if r is not None:
                r.memory = mem
                r.peak_memory = max(r.peak_memory, mem)
        self.peak_tree = max(self.peak_tree, readings.tree)
        t = time.monotonic() - self._t0
        if t - self._last_kept >= 1.0:
            self._samples.append(MemorySampleRecord(time.time(), readings.tree, readings.available, self.budget,
                                                    len(running)))
            self._last_kept = t
        if time.monotonic() - self._last_flush > 5 and self._samples:
            self.flush_samples()
        self.readings = readings
        return readings

    def flush_samples(self) -> None:
        samples, self._samples = self._samples, []
        self._last_flush = time.monotonic()
        self.record_samples(samples)

    # ---- one dataset-level task ----------------------------------------------------------------------------------

    def run_one(self, task: Any, max_deaths: int = 3) -> DatasetResult:
        """Runs a dataset-level task (reader, aggregation, plan) in a worker, alone, sampled like a case.

        A worker that dies is replaced, as a case's would be, up to `max_deaths` deaths. An error the task reports
        stops the run with its message; a signal stops it after the grace period.
        """
        for death_count in range(1, max_deaths + 1):
            try:
                return self._run_one_attempt(task)
            except WorkerDied as died:
                if death_count == max_deaths:
                    raise NnresumeError(f"the {task.stage} step's worker died {max_deaths} times; the last "
                                        f"{died.description}", "check the machine's memory (`dmesg`), then run the "
                                        "same command again; finished cases are kept") from None
                log.warning("the %s step's worker %s; retrying (death %d of %d)", task.stage, died.description,
                            death_count, max_deaths)
        raise AssertionError("unreachable")

    def _run_one_attempt(self, task: Any) -> DatasetResult:
        self.pool.submit(task, 0)
        wall = time.time()
        result: Optional[DatasetResult] = None
        failure: Optional[TaskFailed] = None
        death: Optional[Death] = None
        peak = 0
        over = 0  # the tree's memory when the step was stopped for going past the budget
        ended = False
        while not ended:
            for event in self.pool.poll(TICK):
                if isinstance(event, Received):
                    if isinstance(event.message, TaskFailed):
                        failure = event.message
                    elif isinstance(event.message, DatasetResult):
                        result = event.message
                elif isinstance(event, Ended):
                    death, ended = event.death, True
            readings = self._sample({})
            peak = max(peak, readings.per_task.get(task.task_id, 0))
            if not ended and self.stop and (self.stop.force or time.monotonic() > (self.stop.at or 0) + self.grace):
                self.pool.kill(task.task_id)
            if not ended and readings.tree > self.budget and not self.thresholds.allow_oversize and not over:
                over = readings.tree
                self.pool.kill(task.task_id)
        outcome = "ok" if result and not failure and not death else "error" if failure else "died"
        self.record_attempt(AttemptRecord(
            run_id=self.run_id, case_name=task.case, stage=task.stage, targets=list(task.targets), started_at=wall,
            ended_at=time.time(), outcome=outcome if not (death and death.killed_by_us) else "stopped",
            exit_code=death.exit_code if death else 0, signal=death.signal if death else None,
            peak_rss=result.peak_rss if result else None, last_rss=peak or None, budget_bytes=self.budget,
            message=failure.message if failure else None))
        self.flush_samples()
        if self.stop and (death or result is None):
            raise Interrupted(self.stop.signal_name or "signal", self.stop.exit_code)
        if over:
            raise NnresumeError(f"the {task.stage} step was stopped at {format_bytes(over)} of process tree memory, "
                                f"over the budget {format_bytes(self.budget)}",
                                f"run the same command with --max-ram {suggest_budget(over)} on a machine that has it "
                                "(finished cases are kept), or with --allow-oversize")
        if failure is not None:
            if failure.kind == "disk":
                raise NnresumeError(failure.message, "free some space and run the same command again")
            raise (UsageError if failure.error == "UsageError" else DatasetError)(failure.message, failure.hint)
        if death is not None:
            how = (f"was killed by {describe_signal(death.signal)}" if death.signal
                   else f"exited with code {death.exit_code}")
            likely = " (the out-of-memory killer, or a kill -9)" if death.signal == 9 else ""
            seen = f" at {format_bytes(peak)} private memory" if peak else ""
            raise WorkerDied(f"{how}{likely}{seen}")
        assert result is not None
        return result

    # ---- the loop ---------------------------------------------------------------------------------------------

    def run(self, scheduler: Scheduler, handler: StageHandler) -> StageStats:
        """Until the queue is empty and nothing runs: collect events, sample memory, honour a signal, then let the
        governor stop or admit cases."""
        stats = StageStats()
        outcomes = StageOutcomes(scheduler, handler, stats, self.pool, self.estimator, self.budget, self.run_id,
                                 self.record_attempt, self.progress)
        st = _Stage(scheduler, handler, outcomes)
        while len(scheduler) or st.running:
            # Slots freed by tasks that ended are filled before their results are committed, so a worker waits for
            # its next task only as long as the governor takes, not for the ledger work of the task it finished.
            events = self._poll(st)
            readings = self._sample(st.running)
            self._honour_signal(st, stats)
            if not stats.halted:
                self._govern(st, readings)
                self._prefetch(st, readings)
            self._process(st, events)
            if stats.halted and not st.running:
                break
            self._update_progress(stats, {t: r for t, r in st.running.items() if not r.queued}, readings)
            if self.tick:
                self.tick()  # the caller's group commit, when one is due
        self.flush_samples()
        stats.peak_tree = self.peak_tree
        return stats

    def _poll(self, st: _Stage) -> list[tuple[RunningTask, Event]]:
        """The pool's events for tasks of this stage; the tasks that ended leave `running` (their slots are free).
        A queued task that started is marked so here."""
        events: list[tuple[RunningTask, Event]] = []
        for event in self.pool.poll(TICK if st.running else 0.0):
            r = st.running.get(event.task_id)
            if r is None:
                continue
            if isinstance(event, Started):
                r.queued, r.started, r.wall_started = False, time.monotonic(), time.time()
                continue
            events.append((r, event))
            if isinstance(event, Ended):
                del st.running[event.task_id]
        return events

    def _process(self, st: _Stage, events: list[tuple[RunningTask, Event]]) -> None:
        """Commits results and classifies endings, in the order the pool reported them."""
        for r, event in events:
            if isinstance(event, Received):
                st.outcomes.received(r, event.message)
                continue
            assert isinstance(event, Ended)
            if r.queued:  # taken back from the pool's queue before it started: it never ran
                self._unqueued(r, st, stopping=bool(self.stop))
                continue
            if r.stop_requested:
                st.stops_pending = max(0, st.stops_pending - 1)
            st.outcomes.ended(r, event.death, stopping=bool(self.stop))

    def _honour_signal(self, st: _Stage, stats: StageStats) -> None:
        """After SIGINT/SIGTERM nothing new starts; running cases get the grace period, then are stopped."""
        if not self.stop:
            return
        if st.grace_deadline is None:
            st.grace_deadline = (self.stop.at or time.monotonic()) + self.grace
            stats.halted = f"stopped by {self.stop.signal_name}"
            if st.running:
                log.warning("%s: no new cases start; waiting up to %.0f s for %d running case(s) to finish "
                            "(signal again to stop them now)", self.stop.signal_name, self.grace, len(st.running))
        if st.running and (self.stop.force or time.monotonic() > st.grace_deadline):
            for task_id, r in st.running.items():
                if not r.stop_requested:
                    log.warning("case %s: stopped at shutdown; it will be redone on the next run", r.item.case)
                    r.stop_requested = True
                    self.pool.kill(task_id)

    def _govern(self, st: _Stage, readings: Readings) -> None:
        """Applies the governor's decision: stop the cases it names, start the ones it admits. Tasks queued in the
        pool are not the governor's: they are taken back whenever it stops a case."""
        cases = [RunningCase(t, r.started, r.item.estimate, r.memory, r.alone) for t, r in st.running.items()
                 if not r.queued]
        decision = decide(readings, cases, st.scheduler.waiting(), self.budget, self.max_workers, self.thresholds,
                          st.stops_pending)
        if decision.stop:
            for task_id, r in st.running.items():
                if r.queued and not r.cancelled:
                    r.cancelled = True
                    self.pool.kill(task_id)
        for task_id in decision.stop:
            r = st.running[task_id]
            if task_id in decision.over_budget:
                r.over_budget = readings.tree
            else:
                log.warning("case %s: stopped to stay under the memory budget (tree %s of %s); it will run again "
                            "with more room", r.item.case, format_bytes(readings.tree), format_bytes(self.budget))
            r.stop_requested = True
            st.stops_pending += 1
            self.pool.kill(task_id)
        for item in st.scheduler.take(decision.admit):
            if item.task_id in decision.oversized:
                log.warning("case %s: estimated peak %s, beside the %s nnresume itself holds, exceeds the "
                            "budget %s; running it alone", item.case, format_bytes(item.estimate),
                            format_bytes(readings.overhead), format_bytes(self.budget))
            self._start(st, item, item.task_id in decision.alone)

    def _prefetch(self, st: _Stage, readings: Readings) -> None:
        """With every worker busy, queues up to `queue_depth` tasks per worker in the pool, each to start the moment
        a running task ends instead of after a turn of this loop (on small cases the workers spent ~40 % of their
        time waiting for it). A queued task starts without asking the governor again, so only while the estimates
        of everything running or queued fit in half the budget and half the memory the machine has free beyond the
        reserve; none beside a case that runs alone, or while a case is being stopped."""
        depth = self.pool.queue_depth * self.max_workers
        if not depth or self.stop or st.stops_pending:
            return
        started = [r for r in st.running.values() if not r.queued]
        queued = [r for r in st.running.values() if r.queued]
        if len(started) < self.max_workers or len(queued) >= depth or any(r.alone for r in started):
            return
        estimates = sum(r.item.estimate for r in queued)
        room_budget = self.budget // 2 - readings.overhead - estimates - sum(
            max(r.item.estimate, r.memory) for r in started)
        room_system = (readings.available - self.thresholds.reserve) // 2 - estimates - sum(
            max(0, r.item.estimate - r.memory) for r in started)
        take: list[str] = []
        for w in st.scheduler.waiting():
            if len(queued) + len(take) >= depth or w.max_concurrency < self.max_workers \
                    or w.estimate > min(room_budget, room_system):
                break
            take.append(w.task_id)
            room_budget -= w.estimate
            room_system -= w.estimate
        for item in st.scheduler.take(take):
            self._start(st, item, alone=False, queued=True)

    def _start(self, st: _Stage, item: QueueItem, alone: bool, queued: bool = False) -> None:
        st.attempts[item.task_id] = st.attempts.get(item.task_id, 0) + 1
        task = st.handler.build(item, st.attempts[item.task_id])
        if task.task_id != item.task_id:  # the pool reports events under the task's id
            raise AssertionError(f"{type(st.handler).__name__} built task {task.task_id} for {item.task_id}")
        st.handler.started(item)
        if queued:
            self.pool.enqueue(task, item.estimate)
        else:
            self.pool.submit(task, item.estimate)
        st.running[item.task_id] = RunningTask(item, task, time.monotonic(), time.time(), alone, queued=queued)

    def _unqueued(self, r: RunningTask, st: _Stage, stopping: bool) -> None:
        """A queued task taken back before it started goes back to the queue as it was (its attempt not counted),
        or, at shutdown, is left pending."""
        if stopping:
            st.handler.ended_badly(r.item, TaskState.pending, "stopped at shutdown", died=False, peak=None)
            return
        st.attempts[r.item.task_id] -= 1
        st.handler.ended_badly(r.item, TaskState.pending, "held back by the memory governor", died=False, peak=None)
        st.scheduler.put_back(r.item)

    def _update_progress(self, stats: StageStats, running: dict[str, RunningTask], readings: Readings) -> None:
        if self.progress is not None:
            self.progress.memory(readings.tree, self.budget, len(running))
