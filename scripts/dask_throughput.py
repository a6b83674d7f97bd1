#!/usr/bin/env python
"""Coordinator throughput on a Dask cluster: how many task completions per second the coordinator commits.

The tasks do nothing on the workers (they return "finished" at once), so what is measured is the coordinator's own
cost per task: the runner's loop and governor, `DaskPool` (submission with a MEMORY request, the done callback, one
`gather` per batch of finished futures), the scheduler's round trip, and the ledger (a task's row marked running when
it starts, its attempt recorded when it ends, grouped commits as in a real run). nnU-Net's own work per case is
not in it: with N cores and cases of T seconds, the coordinator keeps up while N / T stays under this figure.

Two figures: completions per second of wall time (on a small machine the scheduler and the workers compete with the
coordinator for the same cores), and completions per second of the coordinator's own CPU time (all its threads),
which is what bounds it when the scheduler and the workers run elsewhere.

    python scripts/dask_throughput.py --tasks 3000                        # a LocalCluster of 2 worker processes
    python scripts/dask_throughput.py --tasks 3000 --scheduler-address tcp://HOST:8786
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnresume.execution.memory import Estimator
from nnresume.execution.pools.dask import DaskPool
from nnresume.execution.pools.dask_worker import Outcome
from nnresume.execution.runner import Runner, StopFlag
from nnresume.execution.scheduler import QueueItem, Scheduler
from nnresume.ledger.models import TaskState
from nnresume.ledger.repository import Ledger
from nnresume.preprocess.context import GroupCommit
from nnresume.tasks import FingerprintTask, TaskFinished

ESTIMATE = 64 << 20


def trivial(task: Any) -> Outcome:
    """Runs on a worker: nothing, and says so."""
    return Outcome(task.task_id, [TaskFinished(0.0, None)], None, "", "")


@dataclass
class Spec:
    task_id: str
    case: str


class Handler:
    stage = "fingerprint"

    def __init__(self, ledger: Ledger, run_id: int, image: str, staging: Path) -> None:
        self.ledger, self.run_id, self.image, self.staging = ledger, run_id, image, staging

    def build(self, item: QueueItem, attempt: int) -> FingerprintTask:
        return FingerprintTask(item.task_id, item.case, (("image", 0, self.image),), "DatasetFingerprintExtractor",
                               "SimpleITKIO", 1, str(self.staging / f"{item.task_id}-{attempt}"))

    def started(self, item: QueueItem) -> None:
        self.ledger.fingerprint_started(item.case, self.run_id, item.estimate)

    def received(self, item: QueueItem, message: Any) -> None:
        pass

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Any) -> None:
        raise SystemExit(f"{item.case}: {message}")

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--scheduler-address", default=None, help="an existing cluster (default: a LocalCluster)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--threads", type=int, default=16, help="LocalCluster threads per worker (tasks in flight)")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()

    cluster = None
    address = a.scheduler_address
    if address is None:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=a.workers, threads_per_worker=a.threads, processes=True,
                               resources={"MEMORY": 8 << 30}, dashboard_address=None)
        address = cluster.scheduler_address
    with tempfile.TemporaryDirectory(prefix="dask-throughput-") as tmp:
        root = Path(tmp)
        image = root / "raw" / "imagesTr" / "case_0000.nii.gz"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"")
        staging = root / "staging"
        staging.mkdir()
        ledger = Ledger.open(str(root / "ledger.sqlite"))
        run_id = ledger.start_run("preprocess", {}, "bench", os.getpid(), None, "-", "-", None)
        pool = DaskPool(address=address, function=trivial)
        threads, memory = pool.capacity()
        scheduler = Scheduler(threads)
        names = [f"case_{i:06d}" for i in range(a.tasks)]
        ledger.set_case_headers({n: None for n in names})  # as a run's scan does, before the stage
        for n in names:
            scheduler.add(Spec(f"fingerprint:{n}", n), ESTIMATE, {})
        handler = Handler(ledger, run_id, str(image), staging)
        group = GroupCommit(ledger)
        runner = Runner(pool, memory + (1 << 30), threads, Estimator(), run_id, ledger.add_attempt,
                        lambda s: ledger.add_memory_samples(run_id, s), StopFlag(), 20.0, tick=group.tick)
        ledger.start_group()
        t0, cpu0 = time.monotonic(), time.process_time()
        try:
            stats = runner.run(scheduler, handler)
            group.flush()
        finally:
            ledger.end_group()
            pool.shutdown()
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        committed = len(ledger.attempts(run_id))
        ledger.close()
    if cluster is not None:
        cluster.close()
    result = {"tasks": a.tasks, "done": stats.done, "attempts_committed": committed, "threads": threads,
              "wall_s": round(wall, 2), "tasks_per_s": round(stats.done / wall, 1),
              "coordinator_cpu_s": round(cpu, 2), "tasks_per_coordinator_cpu_s": round(stats.done / cpu, 1),
              "load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0 if stats.done == a.tasks == committed else 1


if __name__ == "__main__":
    raise SystemExit(main())
