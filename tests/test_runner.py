"""The runner's loop driven by a scripted pool that forks nothing: admission, the throttle, deaths, retries and
quarantine, each in milliseconds. The same loop with real processes and real signals is in test_worker_death.py and
test_crash_safety.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from nnresume.execution.memory import GIB, MIB, Estimator, Readings, Thresholds
from nnresume.execution.pools.base import Ended, Event, Received, Started
from nnresume.execution.runner import Runner, StopFlag
from nnresume.execution.scheduler import QueueItem, Scheduler
from nnresume.ledger.models import TaskState
from nnresume.tasks import Death, FingerprintResult, TaskFailed, TaskFinished

OVERHEAD = 500 * MIB


@dataclass
class Script:
    """What one attempt at a task does, tick by tick: its memory grows by `grow` per tick up to `peak`, then after
    `ticks` it finishes, fails, or dies with `signal`."""

    ticks: int = 3
    peak: int = 200 * MIB
    grow: int = 100 * MIB
    end: str = "ok"  # ok, fail, die
    signal: int = 9


@dataclass
class _Live:
    task: Any
    script: Script
    tick: int = 0
    memory: int = 0
    killed: bool = False


@dataclass
class FakePool:
    """A pool (pools/base.py) whose tasks follow scripts: case -> one Script per attempt."""

    scripts: dict[str, list[Script]]
    on_this_machine = True
    queue_depth: int = 0
    available: int = 20 * GIB
    live: dict[str, _Live] = field(default_factory=dict)
    max_concurrent: int = 0
    submitted: list[str] = field(default_factory=list)
    queued: list[Any] = field(default_factory=list)  # as LocalPool: started, in order, as running tasks end
    cancelled: list[str] = field(default_factory=list)
    max_queued: int = 0

    def warm_up(self) -> None:
        pass

    def submit(self, task: Any, estimate: int) -> None:
        self.submitted.append(task.case)
        self.live[task.task_id] = _Live(task, self.scripts[task.case].pop(0))
        self.max_concurrent = max(self.max_concurrent, len(self.live))

    def enqueue(self, task: Any, estimate: int) -> None:
        self.queued.append(task)
        self.max_queued = max(self.max_queued, len(self.queued))

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = [Ended(t, Death(exit_code=None, killed_by_us=True)) for t in self.cancelled]
        self.cancelled.clear()
        n = len(events)
        for task_id, w in list(self.live.items()):
            if w.killed:
                events.append(Ended(task_id, Death(exit_code=None, signal=9, killed_by_us=True)))
                del self.live[task_id]
                continue
            w.tick += 1
            w.memory = min(w.script.peak, w.memory + w.script.grow)
            if w.tick < w.script.ticks:
                continue
            del self.live[task_id]
            if w.script.end == "die":
                events.append(Ended(task_id, Death(exit_code=None, signal=w.script.signal)))
            elif w.script.end == "fail":
                events += [Received(task_id, TaskFailed(w.task.case, ["fingerprint"], "case",
                                                        f"case {w.task.case}: bad input")), Ended(task_id, None)]
            else:
                events += [Received(task_id, FingerprintResult(w.task.case, (), "digest", False, peak_rss=w.memory)),
                           Received(task_id, TaskFinished(0.1, w.memory)), Ended(task_id, None)]
        for _ in range(sum(isinstance(e, Ended) for e in events[n:])):
            if self.queued:
                task = self.queued.pop(0)
                self.submit(task, 0)
                events.append(Started(task.task_id))
        return events

    def kill(self, task_id: str) -> None:
        queued = [t for t in self.queued if t.task_id == task_id]
        if queued:
            self.queued.remove(queued[0])
            self.cancelled.append(task_id)
        if task_id in self.live:
            self.live[task_id].killed = True

    def readings(self) -> Readings:
        per_task = {t: w.memory for t, w in self.live.items()}
        return Readings(OVERHEAD + sum(per_task.values()), OVERHEAD, self.available, per_task)

    def private_peak(self, task_id: str, peak_rss: int) -> int:
        return peak_rss

    def stop_all(self) -> None:
        self.live.clear()

    def shutdown(self) -> None:
        self.live.clear()


@dataclass
class Spec:
    case: str

    @property
    def task_id(self) -> str:
        return f"t-{self.case}"


@dataclass
class FakeTask:
    task_id: str
    case: str
    stage: str = "fingerprint"
    targets: list[str] = field(default_factory=lambda: ["fingerprint"])


@dataclass
class Recorder:
    """A stage handler that records what the runner tells it instead of writing a ledger."""

    stage: str = "fingerprint"
    results: list[str] = field(default_factory=list)
    ended: list[tuple[str, TaskState, bool]] = field(default_factory=list)

    def build(self, item: QueueItem, attempt: int) -> FakeTask:
        return FakeTask(item.task_id, item.case)

    def started(self, item: QueueItem) -> None:
        pass

    def received(self, item: QueueItem, message: Any) -> None:
        self.results.append(item.case)

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None:
        self.ended.append((item.case, state, died))

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        return item.units


def run(scripts: dict[str, list[Script]], estimates: dict[str, int], budget: int = 4 * GIB, workers: int = 4,
        stop: Optional[StopFlag] = None, queue_depth: int = 0, held: int = 0) -> tuple[FakePool, Recorder, Any]:
    pool = FakePool(scripts, queue_depth=queue_depth)
    attempts: list[Any] = []
    runner = Runner(pool, budget, workers, Estimator(), 1, attempts.append, lambda samples: None, stop or StopFlag(),
                    0.0, Thresholds(reserve=256 * MIB), sample_every=0.0, held=(lambda: held) if held else None)
    scheduler = Scheduler(workers)
    for case, estimate in estimates.items():
        scheduler.add(Spec(case), estimate, {"fingerprint": 1000})
    recorder = Recorder()
    stats = runner.run(scheduler, recorder)
    return pool, recorder, (stats, attempts)


def test_admission_keeps_the_estimates_under_the_budget() -> None:
    # 4 GiB budget, 0.5 GiB overhead: at most two 1.5 GiB cases at once although four workers are allowed
    cases = {f"c{i}": 1536 * MIB for i in range(5)}
    pool, rec, (stats, _) = run({c: [Script()] for c in cases}, cases)
    assert pool.max_concurrent == 2 and stats.done == 5 and sorted(rec.results) == sorted(cases)


def test_memory_held_outside_the_processes_counts_against_the_budget() -> None:
    # the same cases, with 1.5 GiB held by the run outside its processes (the read cache in RAM): one at a time
    cases = {f"c{i}": 1536 * MIB for i in range(5)}
    pool, rec, (stats, _) = run({c: [Script()] for c in cases}, cases, held=1536 * MIB)
    assert pool.max_concurrent == 1 and stats.done == 5 and sorted(rec.results) == sorted(cases)


def test_largest_case_first() -> None:
    cases = {"small": 100 * MIB, "large": 900 * MIB, "medium": 400 * MIB}
    pool, _, _ = run({c: [Script()] for c in cases}, cases, workers=1)
    assert pool.submitted == ["large", "medium", "small"]


def test_the_newest_case_is_stopped_near_the_budget_and_runs_again() -> None:
    # estimates say 1 GiB each, but both grow to 2 GiB: the tree passes 95 % of the budget and the newest stops
    scripts = {"a": [Script(ticks=6, peak=2 * GIB, grow=GIB)],
               "b": [Script(ticks=6, peak=2 * GIB, grow=GIB), Script(ticks=2, peak=GIB)]}
    pool, rec, (stats, attempts) = run(scripts, {"a": GIB, "b": GIB}, budget=4 * GIB)
    assert stats.stopped == 1 and stats.done == 2 and stats.quarantined == 0
    assert ("b", TaskState.pending, False) in rec.ended, "stopped by the governor, not a death"
    assert [a.outcome for a in attempts if a.case_name == "b"] == ["stopped", "ok"]


def test_a_death_is_retried_with_fewer_cases_beside_it_then_quarantined() -> None:
    scripts = {"bad": [Script(end="die")] * 3, "ok1": [Script()], "ok2": [Script()]}
    pool, rec, (stats, attempts) = run(scripts, {"bad": 500 * MIB, "ok1": 100 * MIB, "ok2": 100 * MIB})
    assert stats.retried == 2 and stats.quarantined == 1 and stats.done == 2
    assert rec.ended[-1] == ("bad", TaskState.quarantined, True)
    assert [a.outcome for a in attempts if a.case_name == "bad"] == ["died"] * 3
    assert all("SIGKILL" in (a.message or "") for a in attempts if a.case_name == "bad")


def test_a_death_then_success_is_not_quarantined() -> None:
    scripts = {"flaky": [Script(end="die", signal=11), Script()]}
    _, rec, (stats, attempts) = run(scripts, {"flaky": 100 * MIB})
    assert stats.retried == 1 and stats.done == 1 and stats.quarantined == 0
    assert "SIGSEGV" in (attempts[0].message or "")


def test_a_failed_case_is_not_retried_and_the_others_go_on() -> None:
    scripts = {"broken": [Script(end="fail")], "fine": [Script()]}
    pool, rec, (stats, _) = run(scripts, {"broken": 100 * MIB, "fine": 100 * MIB})
    assert stats.failed == 1 and stats.done == 1 and pool.submitted.count("broken") == 1
    assert ("broken", TaskState.failed, False) in rec.ended


def test_an_oversized_case_runs_alone() -> None:
    cases = {"huge": 8 * GIB, "a": 100 * MIB, "b": 100 * MIB}
    pool, _, (stats, _) = run({c: [Script()] for c in cases}, cases, budget=4 * GIB)
    assert stats.done == 3 and pool.submitted[0] == "huge"


def test_a_signal_stops_admission_and_the_running_cases() -> None:
    stop = StopFlag()
    stop.set("SIGTERM", 143)
    scripts = {c: [Script(ticks=50)] for c in ("a", "b")}
    pool, rec, (stats, _) = run(scripts, {"a": MIB, "b": MIB}, stop=stop)
    assert pool.submitted == [] and stats.halted == "stopped by SIGTERM"


def test_a_signal_during_a_run_stops_running_cases_after_the_grace() -> None:
    stop = StopFlag()
    pool = FakePool({"a": [Script(ticks=1000)]})
    runner = Runner(pool, 4 * GIB, 2, Estimator(), 1, lambda a: None, lambda s: None, stop, 0.0)
    scheduler = Scheduler(2)
    scheduler.add(Spec("a"), MIB, {"fingerprint": 1})
    original = pool.poll

    def poll(timeout: float) -> list[Event]:
        if pool.submitted and not stop:
            stop.set("SIGINT", 130)  # Ctrl-C once the case runs
        return original(timeout)

    pool.poll = poll  # type: ignore[method-assign]
    rec = Recorder()
    stats = runner.run(scheduler, rec)
    assert stats.halted == "stopped by SIGINT" and rec.ended == [("a", TaskState.pending, False)]


def test_a_case_alone_past_the_budget_is_quarantined_at_once_with_the_budget_it_needs() -> None:
    scripts = {"huge": [Script(ticks=20, peak=6 * GIB, grow=GIB)], "small": [Script()]}
    pool, rec, (stats, attempts) = run(scripts, {"huge": GIB, "small": 100 * MIB}, budget=2 * GIB, workers=1)
    assert stats.quarantined == 1 and stats.done == 1 and pool.submitted.count("huge") == 1, "no second try"
    (quarantined,) = [a for a in attempts if a.case_name == "huge"]
    assert "over the budget 2.0 GiB although it ran alone" in quarantined.message
    assert "--retry-quarantined --max-ram 4G" in quarantined.message  # 2.5 GiB seen, and a quarter more
    assert ("huge", TaskState.quarantined, False) in rec.ended


def test_queued_tasks_start_as_running_ones_end_never_more_than_the_workers() -> None:
    cases = {f"c{i}": 100 * MIB for i in range(8)}
    pool, rec, (stats, attempts) = run({c: [Script()] for c in cases}, cases, budget=8 * GIB, workers=2,
                                       queue_depth=1)
    assert pool.max_queued == 2, "one task queued per worker"
    assert pool.max_concurrent == 2 and stats.done == 8 and sorted(rec.results) == sorted(cases)
    assert rec.ended == [] and [a.outcome for a in attempts] == ["ok"] * 8


def test_nothing_is_queued_unless_the_estimates_fit_half_the_budget() -> None:
    # 0.5 GiB overhead + two running 1 GiB cases + one queued: 3.5 GiB, over half of the 4 GiB budget
    cases = {f"c{i}": GIB for i in range(4)}
    pool, _, (stats, _) = run({c: [Script()] for c in cases}, cases, budget=4 * GIB, workers=2, queue_depth=1)
    assert pool.max_queued == 0 and stats.done == 4


def test_a_stop_by_the_governor_takes_queued_tasks_back_without_counting_an_attempt() -> None:
    # a and b are estimated at 1 GiB but grow to 3.9 GiB: past 95 % of the 8 GiB budget the newest (b) is stopped,
    # and c, queued while there was room, is taken back rather than started in b's place
    scripts = {"a": [Script(ticks=10, peak=3900 * MIB, grow=GIB)],
               "b": [Script(ticks=10, peak=3900 * MIB, grow=GIB), Script(ticks=2, peak=GIB)],
               "c": [Script(ticks=2)]}
    pool, rec, (stats, attempts) = run(scripts, {"a": GIB, "b": GIB, "c": 100 * MIB}, budget=8 * GIB, workers=2,
                                       queue_depth=1)
    assert pool.max_queued == 1 and stats.stopped == 1 and stats.done == 3
    assert ("c", TaskState.pending, False) in rec.ended, "taken back: pending again in the ledger"
    assert [a.outcome for a in attempts if a.case_name == "c"] == ["ok"], "taken back is not an attempt"
    assert pool.submitted.index("c") > pool.submitted.index("a"), "c started only after it was taken back"
    assert pool.max_concurrent <= 2


def test_a_signal_leaves_queued_tasks_pending_and_unstarted() -> None:
    stop = StopFlag()
    pool = FakePool({c: [Script(ticks=1000)] for c in ("a", "b", "c", "d")}, queue_depth=1)
    runner = Runner(pool, 8 * GIB, 2, Estimator(), 1, lambda a: None, lambda s: None, stop, 0.0)
    scheduler = Scheduler(2)
    for c in ("a", "b", "c", "d"):
        scheduler.add(Spec(c), MIB, {"fingerprint": 1})
    original = pool.poll

    def poll(timeout: float) -> list[Event]:
        if pool.queued and not stop:
            stop.set("SIGINT", 130)
        return original(timeout)

    pool.poll = poll  # type: ignore[method-assign]
    rec = Recorder()
    stats = runner.run(scheduler, rec)
    assert stats.halted == "stopped by SIGINT" and len(pool.submitted) == 2
    assert sorted(rec.ended) == [(c, TaskState.pending, False) for c in ("a", "b", "c", "d")]
