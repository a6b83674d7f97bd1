"""The memory governor and the scheduler, with injected memory readings: no real memory pressure needed."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nnresume.execution.memory import (
    GIB,
    MIB,
    Estimator,
    Readings,
    RunningCase,
    Thresholds,
    TreeSampler,
    Waiting,
    decide,
    default_budget,
    resampled_voxels,
)
from nnresume.execution.scheduler import MAX_DEATHS, Scheduler

TH = Thresholds(reserve=512 * MIB)


def readings(tree: int = 1 * GIB, overhead: int = 1 * GIB, available: int = 64 * GIB) -> Readings:
    return Readings(tree=tree, overhead=overhead, available=available)


def running(task_id: str, started: float, estimate: int, memory: int = 0, alone: bool = False) -> RunningCase:
    return RunningCase(task_id, started, estimate, memory, alone)


# ---- admission ---------------------------------------------------------------------------------------------------

def test_admits_largest_first_until_the_budget_is_full() -> None:
    waiting = [Waiting("a", 6 * GIB), Waiting("b", 3 * GIB), Waiting("c", 2 * GIB), Waiting("d", 1 * GIB)]
    d = decide(readings(), [], waiting, budget=11 * GIB, max_workers=8, thresholds=TH)
    # 1 (overhead) + 6 + 3 = 10; c (2) does not fit, d (1) fills the gap
    assert d.admit == ["a", "b", "d"]
    assert d.stop == []


def test_respects_the_worker_cap() -> None:
    waiting = [Waiting(str(i), 100 * MIB) for i in range(10)]
    d = decide(readings(), [], waiting, budget=64 * GIB, max_workers=3, thresholds=TH)
    assert d.admit == ["0", "1", "2"]


def test_counts_running_cases_at_their_estimate_or_their_use_whichever_is_more() -> None:
    # estimated 2 GB, now using 5 GB: counted as 5, so 1 + 5 + 3 = 9 does not fit in 8.5 (1 + 2 + 3 = 6 would)
    run = [running("r", 0.0, estimate=2 * GIB, memory=5 * GIB)]
    d = decide(readings(tree=6 * GIB), run, [Waiting("w", 3 * GIB)], budget=int(8.5 * GIB), max_workers=4,
               thresholds=TH)
    assert d.admit == []
    d = decide(readings(tree=6 * GIB), run, [Waiting("w", 3 * GIB)], budget=int(9.5 * GIB), max_workers=4,
               thresholds=TH)
    assert d.admit == ["w"]
    # estimated 5 GB, using 1 GB so far: counted as 5, since it will grow
    run = [running("r", 0.0, estimate=5 * GIB, memory=1 * GIB)]
    d = decide(readings(tree=2 * GIB), run, [Waiting("w", 3 * GIB)], budget=int(8.5 * GIB), max_workers=4,
               thresholds=TH)
    assert d.admit == []


def test_machine_free_memory_limits_admission_too() -> None:
    # budget is generous but the machine (or cgroup) has little free: other programs use it
    d = decide(readings(available=3 * GIB), [running("r", 0, GIB, GIB)], [Waiting("w", 3 * GIB)],
               budget=64 * GIB, max_workers=4, thresholds=TH)
    assert d.admit == []


def test_nothing_starts_under_the_reserve() -> None:
    d = decide(readings(available=400 * MIB), [running("r", 0, GIB, GIB)], [Waiting("w", 10 * MIB)],
               budget=64 * GIB, max_workers=4, thresholds=TH)
    assert d.admit == [] and "reserve" in d.reason


def test_an_oversized_case_runs_alone_when_nothing_else_runs() -> None:
    d = decide(readings(), [], [Waiting("huge", 40 * GIB), Waiting("small", GIB)], budget=10 * GIB,
               max_workers=4, thresholds=TH)
    assert d.admit == ["huge"] and d.alone == ["huge"] and d.oversized == ["huge"]


def test_an_oversized_case_waits_while_others_run_but_small_ones_fill_in() -> None:
    d = decide(readings(tree=3 * GIB), [running("r", 0, 2 * GIB, 2 * GIB)],
               [Waiting("huge", 40 * GIB), Waiting("small", GIB)], budget=10 * GIB, max_workers=4, thresholds=TH)
    assert d.admit == ["small"]


def test_nothing_beside_a_case_that_runs_alone() -> None:
    d = decide(readings(), [running("r", 0, GIB, GIB, alone=True)], [Waiting("w", MIB)], budget=64 * GIB,
               max_workers=4, thresholds=TH)
    assert d.admit == []


def test_max_concurrency_after_deaths() -> None:
    run = [running("a", 0, GIB), running("b", 1, GIB)]
    d = decide(readings(), run, [Waiting("retry", GIB, max_concurrency=2), Waiting("x", GIB)], budget=64 * GIB,
               max_workers=4, thresholds=TH)
    assert d.admit == ["x"]  # "retry" would be the third case; it waits for fewer
    d = decide(readings(), [], [Waiting("retry", GIB, max_concurrency=1)], budget=64 * GIB, max_workers=4,
               thresholds=TH)
    assert d.admit == ["retry"] and d.alone == ["retry"]


def test_a_blocking_case_stops_smaller_ones_overtaking() -> None:
    run = [running("r", 0, 6 * GIB, 6 * GIB)]
    waiting = [Waiting("big", 8 * GIB, blocking=True), Waiting("small", GIB)]
    d = decide(readings(tree=7 * GIB), run, waiting, budget=10 * GIB, max_workers=4, thresholds=TH)
    assert d.admit == [] and "big" in d.reason


# ---- throttle ----------------------------------------------------------------------------------------------------

def test_stops_the_newest_case_when_the_tree_nears_the_budget() -> None:
    run = [running("old", 1.0, GIB, 4 * GIB), running("new", 5.0, GIB, 4 * GIB), running("mid", 3.0, GIB, GIB)]
    d = decide(readings(tree=9.6 * GIB), run, [Waiting("w", MIB)], budget=10 * GIB, max_workers=4, thresholds=TH)
    assert d.stop == ["new"] and d.admit == []


def test_stops_the_newest_case_when_the_machine_runs_out() -> None:
    run = [running("old", 1.0, GIB, GIB), running("new", 2.0, GIB, GIB)]
    d = decide(readings(tree=3 * GIB, available=100 * MIB), run, [], budget=64 * GIB, max_workers=4, thresholds=TH)
    assert d.stop == ["new"]


def test_a_case_running_alone_past_the_budget_is_stopped_for_good() -> None:
    """The budget is a promise: alone, a case cannot get more room, so past the budget it stops (quarantined)."""
    d = decide(readings(tree=20 * GIB), [running("only", 0, GIB, 19 * GIB)], [], budget=10 * GIB, max_workers=4,
               thresholds=TH)
    assert d.stop == ["only"] and d.over_budget == ["only"]
    # under the budget, or with --allow-oversize, it runs on
    assert decide(readings(tree=9 * GIB), [running("only", 0, GIB, 8 * GIB)], [], budget=10 * GIB, max_workers=4,
                  thresholds=TH).stop == []
    lenient = Thresholds(reserve=TH.reserve, allow_oversize=True)
    assert decide(readings(tree=20 * GIB), [running("only", 0, GIB, 19 * GIB)], [], budget=10 * GIB, max_workers=4,
                  thresholds=lenient).stop == []


def test_one_stop_at_a_time() -> None:
    run = [running("a", 1.0, GIB, 5 * GIB), running("b", 2.0, GIB, 5 * GIB)]
    d = decide(readings(tree=11 * GIB), run, [Waiting("w", MIB)], budget=10 * GIB, max_workers=4, thresholds=TH,
               stops_pending=1)
    assert d.stop == [] and d.admit == []


@settings(max_examples=500, deadline=None)
@given(budget=st.integers(2 * GIB, 64 * GIB), overhead=st.integers(100 * MIB, 2 * GIB),
       run=st.lists(st.tuples(st.integers(0, 8 * GIB), st.integers(0, 8 * GIB)), max_size=6),
       waiting=st.lists(st.integers(1, 16 * GIB), max_size=12), workers=st.integers(1, 8))
def test_whatever_is_admitted_fits_the_budget(budget, overhead, run, waiting, workers) -> None:
    """Admitted cases fit beside the running ones, except one case started alone when nothing runs."""
    cases = [running(f"r{i}", float(i), est, mem) for i, (est, mem) in enumerate(run)]
    r = Readings(tree=overhead + sum(mem for _, mem in run), overhead=overhead, available=10**15)
    w = [Waiting(f"w{i}", est) for i, est in enumerate(sorted(waiting, reverse=True))]
    d = decide(r, cases, w, budget, workers, Thresholds(reserve=0))
    if not d.admit:
        return
    assert not d.stop
    if not cases and d.alone:
        assert d.admit == d.alone and len(d.admit) == 1
        return
    assert len(cases) + len(d.admit) <= workers
    estimates = {x.task_id: x.estimate for x in w}
    committed = overhead + sum(max(e, m) for e, m in run) + sum(estimates[t] for t in d.admit)
    assert committed <= budget


# ---- scheduler ---------------------------------------------------------------------------------------------------

class Spec:
    def __init__(self, name: str) -> None:
        self.task_id, self.case = f"t-{name}", name


def test_queue_is_largest_first() -> None:
    s = Scheduler(max_workers=2)
    for name, est in [("a", 1), ("b", 5), ("c", 3)]:
        s.add(Spec(name), est * GIB, {})
    assert [w.task_id for w in s.waiting()] == ["t-b", "t-c", "t-a"]


def test_a_case_overtaken_too_often_becomes_blocking() -> None:
    s = Scheduler(max_workers=1, max_bypass=2)
    s.add(Spec("big"), 10 * GIB, {})
    for i in range(3):
        s.add(Spec(f"s{i}"), GIB, {})
        s.take([f"t-s{i}"])
    assert s.get("t-big").blocking
    assert s.waiting()[0].task_id == "t-big" and s.waiting()[0].blocking


def test_deaths_lower_concurrency_then_quarantine() -> None:
    s = Scheduler(max_workers=8)
    item = s.add(Spec("x"), GIB, {})
    s.take(["t-x"])
    assert s.died(item, 3 * GIB, "killed by SIGKILL") is True
    assert item.max_concurrency == 4 and item.estimate >= 3 * GIB
    s.take(["t-x"])
    assert s.died(item, None, "killed by SIGKILL") is True
    assert item.max_concurrency == 1 and item.blocking
    s.take(["t-x"])
    assert s.died(item, None, "killed by SIGKILL") is False
    assert item.deaths == MAX_DEATHS and len(s) == 0


def test_on_a_cluster_deaths_do_not_hold_the_other_workers_back() -> None:
    """The cluster back end gives a retried case a whole worker; the scheduler must not also make it run alone."""
    s = Scheduler(max_workers=8, shrink_after_deaths=False)
    item = s.add(Spec("x"), GIB, {})
    s.take(["t-x"])
    assert s.died(item, 3 * GIB, "killed by SIGKILL") is True
    s.take(["t-x"])
    assert s.died(item, None, "killed by SIGKILL") is True
    assert item.max_concurrency > 8 and not item.blocking and item.estimate >= 3 * GIB
    s.take(["t-x"])
    assert s.died(item, None, "killed by SIGKILL") is False  # still quarantined after three


def test_governor_stops_raise_the_estimate_and_never_quarantine() -> None:
    s = Scheduler(max_workers=4)
    item = s.add(Spec("x"), GIB, {})
    for _ in range(5):
        s.take(["t-x"])
        s.stopped(item, 2 * GIB)
    assert item.deaths == 0 and item.estimate >= 3 * GIB and item.max_concurrency == 1 and len(s) == 1


# ---- readings and estimates -----------------------------------------------------------------------------------

def test_sampler_counts_shared_pages_once() -> None:
    clock = [0.0]
    rss = {1: 400 * MIB, 2: 500 * MIB, 10: 300 * MIB, 11: 320 * MIB}
    uss = {10: 20 * MIB, 11: 40 * MIB}
    sampler = TreeSampler(full_interval=2.0, read_rss=rss.get, read_uss=uss.get, read_available=lambda: 8 * GIB,
                          clock=lambda: clock[0])
    r = sampler.sample([1, 2], {"a": 10, "b": 11})
    assert r.overhead == 900 * MIB and r.per_task == {"a": 20 * MIB, "b": 40 * MIB}
    assert r.tree == 960 * MIB
    # between full reads, growth in RSS is private memory
    clock[0] = 1.0
    rss[10] += 1 * GIB
    r = sampler.sample([1, 2], {"a": 10, "b": 11})
    assert r.per_task["a"] == 20 * MIB + GIB
    # a full read replaces the carried value
    clock[0] = 2.5
    uss[10] = 900 * MIB
    r = sampler.sample([1, 2], {"a": 10, "b": 11})
    assert r.per_task["a"] == 900 * MIB and sampler.shared[10] == rss[10] - 900 * MIB


def test_estimator_learns_from_measured_peaks() -> None:
    e = Estimator()
    units = {"preprocess:x": 10_000_000}
    prior = e.estimate(units)
    e.observe("preprocess:x", 10_000_000, e.base + 200_000_000)
    learned = e.estimate(units)
    assert learned != prior and abs(learned - (e.base + 200_000_000 * 1.15)) < 1000
    assert e.estimate({"preprocess:x": 10_000_000, "gt": 0}) == learned  # a task needs its largest target


def test_resampled_voxels() -> None:
    assert resampled_voxels([10, 100, 100], [3.0, 1.0, 1.0], [1.5, 0.5, 0.5], [0, 1, 2]) == 10 * 100 * 100 * 8
    # 2d keeps the out-of-plane axis (after transpose)
    assert resampled_voxels([10, 100, 100], [3.0, 1.0, 1.0], [0.5, 0.5], [0, 1, 2]) == 10 * 100 * 100 * 4


def test_default_budget_keeps_a_reserve() -> None:
    assert default_budget(24 * GIB) == 24 * GIB - int(2.4 * GIB)
    assert default_budget(4 * GIB) == 3 * GIB
    assert default_budget(100 * GIB) == 96 * GIB


def test_default_budget_in_a_jobs_own_cgroup_keeps_a_tenth() -> None:
    mib = 2**20
    assert default_budget(2000 * mib, own_cgroup=True) == 1800 * mib  # 1000 MiB on a shared machine
    assert default_budget(2000 * mib) == 1000 * mib
    assert default_budget(100 * GIB, own_cgroup=True) == 96 * GIB
