"""Which case runs next, and what happens to a case whose worker died or was stopped.

Order: largest estimate first, so the big cases start early and the small ones fill the gaps (first-fit decreasing),
and the last minutes of a run are not one large case on one core. A waiting case that smaller ones have overtaken
too often becomes *blocking*: nothing more is started past it until it starts, so no case starves.

Retries: a worker killed by a signal it did not get from us (the OOM killer, a segfault) or that raised MemoryError
is retried with less concurrency: after one death with at most half as many cases beside it, after two alone; the
third death quarantines the case. On a cluster (`shrink_after_deaths` off) the back end gives the retry a whole
worker instead: running it alone would leave every other worker idle. A case the governor stopped to save memory
is not at fault: it goes back to the queue with its estimate raised to what it had reached, and after several stops
it runs alone.

No SQL, no processes here: the runner applies these decisions.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .memory import Candidate

MAX_DEATHS = 3
STOPS_BEFORE_ALONE = 3
GROWTH_AFTER_STOP = 1.5
GROWTH_AFTER_DEATH = 1.25


@dataclass
class QueueItem:
    spec: Any  # stage-specific description of the work (has task_id and case); the handler builds the task
    estimate: int
    units: dict[str, int]
    seq: int
    fixed: int = 0  # bytes of the estimate that do not scale with the case's size (not learned from its peak)
    deaths: int = 0
    stops: int = 0
    max_concurrency: int = 1 << 30
    bypassed: int = 0
    blocking: bool = False
    history: list[str] = field(default_factory=list)

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def case(self) -> str:
        return self.spec.case


class Scheduler:
    def __init__(self, max_workers: int, max_bypass: Optional[int] = None, max_deaths: int = MAX_DEATHS,
                 shrink_after_deaths: bool = True) -> None:
        self.max_workers = max_workers
        self.shrink_after_deaths = shrink_after_deaths
        self.max_bypass = max_bypass if max_bypass is not None else max(4, 2 * max_workers)
        self.max_deaths = max_deaths
        self._queue: dict[str, QueueItem] = {}
        self._seq = itertools.count()
        # the queue in priority order, kept between calls: sorting 25,000 items on every turn of the runner's loop
        # cost more than the small cases themselves; None when it must be sorted again
        self._ordered: Optional[list[QueueItem]] = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, spec: Any, estimate: int, units: dict[str, int], deaths: int = 0, fixed: int = 0) -> QueueItem:
        item = QueueItem(spec, estimate, units, next(self._seq), deaths=deaths, fixed=fixed)
        if deaths:
            item.max_concurrency = self._concurrency_after_deaths(deaths)
        self._queue[item.task_id] = item
        self._ordered = None
        return item

    def _order(self) -> list[QueueItem]:
        if self._ordered is None:
            self._ordered = sorted(self._queue.values(), key=lambda i: (not i.blocking, -i.estimate, i.seq))
        return self._ordered

    def waiting(self) -> Sequence[Candidate]:
        """The waiting items in priority order (read-only: the scheduler keeps this list)."""
        return self._order()

    def get(self, task_id: str) -> QueueItem:
        return self._queue[task_id]

    def take(self, admitted: list[str]) -> list[QueueItem]:
        """Removes the admitted items; those they overtook count one bypass more."""
        if not admitted:
            return []
        order = self._order()
        wanted, positions = set(admitted), []
        for n, item in enumerate(order):  # the admitted items are at the front: the governor walks from there
            if item.task_id in wanted:
                positions.append(n)
                if len(positions) == len(wanted):
                    break
        reordered = False
        for item in order[:positions[-1]]:
            if item.task_id not in wanted:
                item.bypassed += 1
                if item.bypassed > self.max_bypass and not item.blocking:
                    item.blocking = reordered = True
        if reordered:
            self._ordered = None
        else:
            for n in reversed(positions):
                del order[n]
        return [self._queue.pop(t) for t in admitted]

    def _concurrency_after_deaths(self, deaths: int) -> int:
        if not self.shrink_after_deaths:
            return 1 << 30
        return 1 if deaths >= 2 else max(1, self.max_workers // 2)

    def died(self, item: QueueItem, memory_seen: Optional[int], how: str) -> bool:
        """A worker died (or ran out of memory) on this item. Returns True if it is requeued, False to quarantine."""
        item.deaths += 1
        item.history.append(how)
        if item.deaths >= self.max_deaths:
            return False
        item.max_concurrency = min(item.max_concurrency, self._concurrency_after_deaths(item.deaths))
        if memory_seen:
            item.estimate = max(item.estimate, int(memory_seen * GROWTH_AFTER_DEATH))
        self._requeue(item)
        return True

    def stopped(self, item: QueueItem, memory_seen: Optional[int]) -> None:
        """The governor stopped this item to save memory; it goes back with more room."""
        item.stops += 1
        item.history.append("stopped by the memory governor")
        if memory_seen:
            item.estimate = max(item.estimate, int(memory_seen * GROWTH_AFTER_STOP))
        if item.stops >= STOPS_BEFORE_ALONE:
            item.max_concurrency = 1
        self._requeue(item)

    def put_back(self, item: QueueItem) -> None:
        """An item taken but never started returns as it was."""
        self._queue[item.task_id] = item
        self._ordered = None

    def _requeue(self, item: QueueItem) -> None:
        item.bypassed = 0
        item.blocking = item.max_concurrency == 1 or item.blocking
        self._ordered = None
        self._queue[item.task_id] = item

