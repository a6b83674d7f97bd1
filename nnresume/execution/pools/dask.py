"""Running cases on a Dask distributed cluster: `DaskPool`, the runner's `Pool` interface (base.py) over a
`distributed.Client`.

What runs where
- Case tasks (fingerprint, preprocess) become Dask tasks: `dask_worker.run_task` runs each in a child process of its
  Dask worker and returns the child's messages and its death, if it died. The ledger stays single-writer: workers
  stage files on the shared file system, the coordinator (the `nnresume` process) commits them.
- Dataset-level steps (reader, aggregation, plan, class check) run on the coordinator, in a `LocalPool`: they are
  one each per run, and nnU-Net's planner finds its inputs through the coordinator's own nnUNet_* variables.
- Every Dask key carries a token of this pool: results of tasks a killed coordinator submitted never reach the next
  one (the scheduler releases a gone client's futures, and their workers kill the children on noticing it).

Deaths stay nnresume's: a child killed on its worker comes back as the task's `Death`; a Dask worker lost mid-task
comes back as a death too (the task's marker file, see dask_worker.py, or `KilledWorker` from the scheduler); the
runner retries with more room and quarantines after three, as on one machine.

Memory: each case's estimate becomes a resource request, `resources={"MEMORY": estimate}`, when the workers declare
a MEMORY resource (`dask worker --resources MEMORY=<bytes>`): the scheduler then never places more estimated memory on
a worker than it declares. A case whose estimate exceeds every worker's MEMORY is not submitted (Dask would keep it
waiting forever): it fails with a message saying so. Without a MEMORY resource on any worker, cases are submitted
without a request, and Dask places them by threads alone.

A case whose worker died is retried with more room: its next request is the largest MEMORY any worker declares,
so it gets a worker to itself (and the runner does not hold the rest of the cluster back for it, as it would
on one machine: see scheduler.py).

The coordinator's governor (memory.decide) must not throttle the cluster by the coordinator's RAM. So:
- `readings()` reports the coordinator process only (one RSS read, no network; it is called up to ten times a
  second), and as `available` the cluster's declared memory plus the governor's reserve (meant for this machine).
  Nothing is stopped for the coordinator's sake.
- `settings_for()` gives the run `max_workers` = the cluster's worker threads (so the runner keeps that many tasks in
  flight) and a budget = the cluster's declared memory (the sum of its workers' MEMORY, or of their memory limits
  when none declares MEMORY) plus 1 GiB for the coordinator, which the governor counts as overhead. `decide` then
  admits cases while the sum of the running estimates fits the cluster, and the scheduler keeps each worker within
  its own MEMORY. `-np` and `--max-ram`, when given, still apply.
"""
from __future__ import annotations

import logging
import os
import queue
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Optional

import psutil

from ...config import MemoryBudget, PreprocessSettings, format_bytes
from ...errors import NnresumeError
from ...tasks import Death, FingerprintTask, PreprocessTask, TaskFailed
from ..memory import DEFAULT_THRESHOLDS, Readings
from . import dask_worker
from .base import Ended, Event, Received
from .local import LocalPool

log = logging.getLogger(__name__)

REFRESH_EVERY = 2.0  # seconds between looks at the scheduler's list of workers (only while submitting)
GRAIN = 64 << 20  # MEMORY requests are rounded up to this, so that tasks of similar size go in one message
UNBOUNDED = 1 << 50  # the budget of a cluster whose workers declare no memory at all
COORDINATOR = 1 << 30  # added to the cluster's memory in the budget: the governor counts the coordinator's own in it
CASE_TASKS = (FingerprintTask, PreprocessTask)


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    host: str
    threads: int
    memory: Optional[int]  # its MEMORY resource
    memory_limit: int  # its --memory-limit (0: none)


class DaskPool:
    on_this_machine = False  # cases run on the cluster's workers, each within its own MEMORY
    queue_depth = 0  # the scheduler queues tasks itself: the runner hands over only what may start

    def __init__(self, address: Optional[str] = None, scheduler_file: Optional[str] = None,
                 wait_for_workers: float = 600.0, connect_timeout: float = 60.0, local: Optional[LocalPool] = None,
                 function: Any = None) -> None:
        import distributed

        self.where = address or scheduler_file or "?"
        # the client logs each failed reconnection with a traceback; the pool's own errors say what happened.
        # distributed's logging configuration gives several of its loggers their own level and handler.
        for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            self.client = distributed.Client(address=address, scheduler_file=scheduler_file,
                                             timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise NnresumeError(f"cannot reach the Dask scheduler at {self.where}: {e}",
                                "start it (dask scheduler) and its workers, or check --scheduler-address / "
                                "--scheduler-file") from None
        self.where = getattr(self.client.scheduler, "address", None) or self.where
        self._function = function or dask_worker.run_task
        self._local = local or LocalPool()
        self._local_tasks: set[str] = set()
        self._token = uuid.uuid4().hex[:8]
        self._futures: dict[str, Any] = {}
        self._what: dict[str, tuple[str, list[str]]] = {}  # task id -> (case, targets), for messages
        self._killed: set[str] = set()
        self._done: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()  # (task id, its future) when done
        self._events: list[Event] = []
        self._shared: dict[str, int] = {}
        self._ended: list[str] = []
        self._pending: list[tuple[Any, int]] = []  # (task, MEMORY request) submitted, not yet sent
        self._deaths: dict[str, int] = {}  # task id -> deaths seen by this pool (its retries get a whole worker)
        self._workers: dict[str, WorkerInfo] = {}
        self._checked: set[tuple[str, tuple[str, ...]]] = set()
        self._refreshed = -float("inf")
        self._me = psutil.Process()
        self._wait(wait_for_workers)

    # ---- the cluster ------------------------------------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        self._refresh(force=True)
        if self._workers:
            return
        log.info("waiting up to %.0f s for a Dask worker to join the scheduler at %s", timeout, self.where)
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise NnresumeError(f"no Dask worker joined the scheduler at {self.where} in {timeout:.0f} s",
                                "start workers (dask worker ... --resources MEMORY=<bytes>), then run the same "
                                "command again") from None
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed < REFRESH_EVERY:
            return
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except Exception as e:  # the comm's errors vary with the transport
            raise self._gone(e) from None
        self._refreshed = time.monotonic()
        workers = {}
        for address, w in (info.get("workers") or {}).items():
            memory = (w.get("resources") or {}).get("MEMORY")
            workers[address] = WorkerInfo(address, str(w.get("host", "")), int(w.get("nthreads", 1)),
                                          int(memory) if memory is not None else None,
                                          int(w.get("memory_limit") or 0))
        self._workers = workers

    def capacity(self) -> tuple[int, int]:
        """The cluster's worker threads and declared memory (see the module docstring), as last seen."""
        declared = [w.memory for w in self._workers.values() if w.memory is not None]
        memory = sum(declared) if declared else (sum(w.memory_limit for w in self._workers.values()) or UNBOUNDED)
        return sum(w.threads for w in self._workers.values()) or 1, memory

    def settings_for(self, settings: PreprocessSettings) -> PreprocessSettings:
        """`settings` with the cluster's threads as -np and its declared memory as --max-ram, unless given."""
        self._refresh(force=True)
        threads, memory = self.capacity()
        given = settings.max_ram.bytes is not None or settings.max_ram.fraction is not None
        log.info("Dask cluster at %s: %d worker(s), %d thread(s), %s declared memory", self.where,
                 len(self._workers), threads, format_bytes(memory) if memory < UNBOUNDED else "no")
        return replace(settings, num_workers=settings.num_workers or threads,
                       max_ram=settings.max_ram if given else MemoryBudget(bytes=memory + COORDINATOR))

    def _gone(self, error: BaseException) -> NnresumeError:
        return NnresumeError(f"the Dask scheduler at {self.where} is gone ({type(error).__name__}: {error})",
                             "start the scheduler and its workers again, then run the same command: finished cases "
                             "are kept")

    def _check_connected(self) -> None:
        if self.client.status not in ("running", "connecting", "newly-created"):
            raise self._gone(ConnectionError(f"client {self.client.status}"))

    def _check_paths(self, task: Any) -> None:
        """Once per worker and dataset: the worker sees the task's inputs and the run's staging folder."""
        inputs = task.files[0][2] if isinstance(task, FingerprintTask) else task.images[0]
        dirs = tuple(sorted({os.path.dirname(inputs), os.path.dirname(task.staging)}))
        new = [a for a in self._workers if (a, dirs) not in self._checked]
        if not new:
            return
        try:
            missing = self.client.run(dask_worker.missing_paths, list(dirs), workers=new, on_error="return")
        except Exception as e:
            raise self._gone(e) from None
        for address in new:
            m = missing.get(address)
            if isinstance(m, BaseException):
                raise NnresumeError(f"the Dask worker {address} cannot run nnresume's code: {m!r}",
                                    "install nnresume (the same version) in the workers' environment")
            if m:
                host = self._workers[address].host
                raise NnresumeError(f"the Dask worker {address} on {host} cannot see {m[0]}", dask_worker.SHARED_HINT)
            self._checked.add((address, dirs))

    # ---- the Pool interface -----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        self._local.warm_up()

    def enqueue(self, task: Any, estimate: int) -> None:
        self.submit(task, estimate)  # not called while queue_depth is 0

    def submit(self, task: Any, estimate: int) -> None:
        if not isinstance(task, CASE_TASKS):
            self._local_tasks.add(task.task_id)
            self._local.submit(task, estimate)
            return
        self._check_connected()
        self._refresh()
        self._check_paths(task)
        declared = [w.memory for w in self._workers.values() if w.memory is not None]
        if declared and estimate > max(declared):
            self._too_large(task, estimate, max(declared))
            return
        if declared and self._deaths.get(task.task_id):
            estimate = max(estimate, max(declared))
        request = min(-(-estimate // GRAIN) * GRAIN, max(declared)) if declared and estimate > 0 else 0
        self._pending.append((task, request))
        self._what[task.task_id] = (task.case, list(task.targets))

    def _flush(self) -> None:
        """Sends the tasks submitted since the last poll: one message to the scheduler per memory request, not one
        per task (the runner submits a burst of tasks at a time; a message each cost more than the rest of the
        coordinator's work per task)."""
        pending, self._pending = self._pending, []
        groups: dict[int, list[Any]] = {}
        for task, request in pending:
            groups.setdefault(request, []).append(task)
        for request, tasks in groups.items():
            keys = [f"nnresume-{os.path.basename(t.staging)}-{self._token}" for t in tasks]
            try:
                futures = self.client.map(self._function, tasks, key=keys, pure=False, retries=0,
                                          resources={"MEMORY": request} if request else None)
            except Exception as e:
                raise self._gone(e) from None
            for task, future in zip(tasks, futures):
                self._futures[task.task_id] = future
                future.add_done_callback(lambda f, task_id=task.task_id: self._done.put((task_id, f)))

    def _too_large(self, task: Any, estimate: int, largest: int) -> None:
        message = (f"case {task.case} ({task.stage}): estimated peak memory {format_bytes(estimate)} exceeds the "
                   f"MEMORY resource of every Dask worker (the largest declares {format_bytes(largest)}), so no "
                   f"worker could take it; not submitted. Start a worker with --resources MEMORY="
                   f"{int(estimate * 1.25)} (and as much --memory-limit and RAM), then run the same command again")
        self._events += [Received(task.task_id, TaskFailed(task.case, list(task.targets), "case", message)),
                         Ended(task.task_id, None)]

    def poll(self, timeout: float) -> list[Event]:
        if self._pending:
            self._flush()
        for task_id in self._ended:
            self._shared.pop(task_id, None)
        self._ended = []
        events, self._events = self._events, []
        deadline = time.monotonic() + timeout
        done: list[tuple[str, Any]] = []
        while True:
            if self._local_tasks:
                for e in self._local.poll(0.0 if events or done else min(0.05, max(0.0, timeout))):
                    events.append(e)
                    if isinstance(e, Ended):
                        self._local_tasks.discard(e.task_id)
            try:
                wait = 0.0 if (events or done or self._local_tasks) else max(0.0, deadline - time.monotonic())
                done.append(self._done.get(timeout=wait) if wait > 0 else self._done.get_nowait())
                while True:
                    done.append(self._done.get_nowait())
            except queue.Empty:
                pass
            if events or done or time.monotonic() >= deadline:
                break
        if done:
            events += self._finished(done)
        elif self._futures:
            self._check_connected()
        return events

    def _finished(self, done: list[tuple[str, Any]]) -> list[Event]:
        """Events of the tasks whose futures are done, results fetched in one round trip. A future that is not the
        task's current one (a stopped attempt's, reported late) is ignored."""
        futures = {t: self._futures.pop(t) for t, f in done if self._futures.get(t) is f}
        ok = {t: f for t, f in futures.items() if f.status == "finished"}
        outcomes: dict[str, Any] = {}
        if ok:
            try:
                results = self.client.gather(list(ok.values()), errors="skip", direct=True)
            except Exception as e:
                raise self._gone(e) from None
            outcomes = {o.task_id: o for o in results}
        events: list[Event] = []
        for task_id, f in futures.items():
            self._ended.append(task_id)
            if task_id in self._killed:
                self._killed.discard(task_id)
                events.append(Ended(task_id, Death(None, killed_by_us=True)))
            elif task_id in outcomes:
                o = outcomes[task_id]
                log.debug("%s ran on %s (%s)", task_id, o.host, o.worker)
                self._shared[task_id] = o.shared
                events += [Received(task_id, m) for m in o.messages]
                events.append(Ended(task_id, o.death))
                if o.death is not None and not o.death.killed_by_us:
                    self._deaths[task_id] = self._deaths.get(task_id, 0) + 1
            else:
                events += self._failed(task_id, f)
            self._what.pop(task_id, None)
        return events

    def _failed(self, task_id: str, future: Any) -> list[Event]:
        from distributed.scheduler import KilledWorker

        self._check_connected()
        if future.status == "cancelled":
            raise self._gone(ConnectionError("the connection was lost and the tasks cancelled"))
        error = future.exception() if future.status == "error" else None
        if isinstance(error, KilledWorker):
            self._deaths[task_id] = self._deaths.get(task_id, 0) + 1
            return [Ended(task_id, Death(None, extra={"how": dask_worker.LOST}))]
        case, targets = self._what.get(task_id, ("?", []))
        message = f"case {case}: the Dask task {future.key} failed on the cluster: {error!r}"
        return [Received(task_id, TaskFailed(case, targets, "case", message)), Ended(task_id, None)]

    def kill(self, task_id: str) -> None:
        """Cancels the task's future: its worker then no longer runs it as wanted, and kills its child (see
        dask_worker.py); `Client.run` makes that immediate where the child already runs."""
        if task_id in self._local_tasks:
            self._local.kill(task_id)
            return
        waiting = [p for p in self._pending if p[0].task_id == task_id]
        if waiting:  # not sent yet
            self._pending = [p for p in self._pending if p[0].task_id != task_id]
            self._events.append(Ended(task_id, Death(None, killed_by_us=True)))
            return
        future = self._futures.get(task_id)
        if future is None or task_id in self._killed:
            return
        self._killed.add(task_id)
        try:
            self.client.run(dask_worker.kill_task, task_id, on_error="ignore")
            future.cancel()
        except Exception as e:
            raise self._gone(e) from None
        self._done.put((task_id, future))

    def readings(self) -> Readings:
        _, memory = self.capacity()
        available = memory + DEFAULT_THRESHOLDS.reserve  # the reserve is meant for this machine, not the cluster
        if self._local_tasks:
            r = self._local.readings()
            return Readings(r.tree, r.overhead, available, r.per_task)
        rss = self._me.memory_info().rss
        return Readings(rss, rss, available, {})

    def private_peak(self, task_id: str, peak_rss: int) -> int:
        if task_id in self._local_tasks:
            return self._local.private_peak(task_id, peak_rss)
        return peak_rss - self._shared.get(task_id, 0)

    def stop_all(self) -> None:
        self._local.stop_all()
        self._local_tasks.clear()
        futures, self._futures = list(self._futures.values()), {}
        self._pending = []
        self._what.clear()
        self._killed.clear()
        self._events = []
        if futures and self.client.status == "running":
            try:
                self.client.cancel(futures)
            except Exception as e:  # the scheduler is gone: its workers drop the tasks themselves
                log.debug("cancelling on the cluster: %s", e)
        while True:
            try:
                self._done.get_nowait()
            except queue.Empty:
                break

    def shutdown(self) -> None:
        try:
            self.stop_all()
        finally:
            self._local.shutdown()
            try:
                self.client.close(timeout=10)
            except Exception as e:
                log.debug("closing the Dask client: %s", e)
