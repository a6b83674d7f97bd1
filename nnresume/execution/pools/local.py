"""Local worker processes, forked from a forkserver that has nnunetv2 imported, each running one task at a time.

Forking from a preloaded forkserver costs milliseconds instead of the ~4 s a fresh interpreter spends importing
nnunetv2. A worker then runs task after task: forking anew for every task cost more than nnU-Net's own work on a
small case (see BENCHMARKS.md). A worker runs one task at a time, so a crash, an OOM kill or the governor's stop
takes only that task with it; its peak memory is its own (the kernel's peak-RSS mark is reset before each task).
A worker is retired, and a fresh one forked when needed, after `MAX_TASKS` tasks or when it keeps more private memory
than `RETIRE_PRIVATE` between tasks (a heap a large case left fragmented), so nothing accumulates for long.

`LocalPool` implements the runner's `Pool` interface (base.py). It also measures memory: the tree of orchestrator,
forkserver and workers, each page once (memory.TreeSampler); an idle worker's private memory counts as overhead.
So does a companion's: a process started beside the workers to serve them (prediction's device process), restarted
through its owner's callback if it dies. A companion that says, through its pipe, which task it is serving ("serving",
task id; then "served", task id, its peak above its idle size) has its memory beyond its idle size counted as that
task's, in the readings and in the task's peak, from which the estimates learn.

How a task ended is classified here: a message saying it finished, or its worker's exit code or signal.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import forkserver
from typing import Any, Optional

from ...tasks import Death, TaskFailed, TaskFinished
from ..memory import MIB, Readings, TreeSampler
from .base import Ended, Event, Received, Started

log = logging.getLogger(__name__)

PRELOAD = ["nnresume.execution.pools.forkserver_preload"]
PRELOAD_ENV = "NNRESUME_FORKSERVER_PRELOAD"
MAX_TASKS = 500  # tasks a worker runs before it is retired
RETIRE_PRIVATE = 384 * MIB  # private memory an idle worker may keep; above it, it is retired


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: Any = None  # the task it runs; None while idle
    next_task: Any = None  # sent already (enqueue): the worker starts it when it finishes `task`
    cancel_next: bool = False  # next_task was taken back: the worker is stopped when it begins it
    tasks_run: int = 0
    private: int = 0  # its private memory when it was last idle
    finished: bool = False  # the current task sent TaskFinished or TaskFailed
    killed_by_us: bool = False


@dataclass
class _Companion:
    process: Any
    conn: Any  # the parent's end of its pipe
    on_exit: Optional[Callable[[Any], None]]
    serving: Optional[str] = None  # the task it says it is working for now
    idle_private: Optional[int] = None  # its private memory when last read while it served no task
    served_peaks: dict[str, int] = field(default_factory=dict)  # task -> its peak above its idle size for that task


def _worker_main(conn: Any) -> None:
    """Runs in the child. The import is free there (the forkserver preloaded it); keeping it out of the parent spares
    the orchestrator importing nnunetv2 on runs that only hash files."""
    from ...worker.run import worker_loop

    worker_loop(conn)


def _companion_main(conn: Any, kind: str, args: tuple[Any, ...]) -> None:
    """Runs in a companion process (see `LocalPool.start_companion`); the import is preloaded, as for workers."""
    from ...worker.run import companion_main

    companion_main(kind, conn, *args)


class LocalPool:
    on_this_machine = True
    queue_depth = 1

    def __init__(self, sampler: Optional[TreeSampler] = None, max_tasks: int = MAX_TASKS,
                 retire_private: int = RETIRE_PRIVATE, preload: tuple[str, ...] = ()) -> None:
        """`preload`: modules the forkserver imports besides the worker's, so that every process forked from it
        shares their pages instead of importing them for itself (prediction's inference code)."""
        self.sampler = sampler or TreeSampler()
        self.max_tasks, self.retire_private = max_tasks, retire_private
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        os.environ[PRELOAD_ENV] = ",".join(preload)  # read by the forkserver when it starts (forkserver_preload.py)
        self._workers: list[_Worker] = []
        self._queued: list[Any] = []  # tasks enqueued while no worker could take one in advance
        self._cancelled: list[str] = []  # queued tasks killed before they started, to report as ended
        self._ids = itertools.count()
        self._companions: list[_Companion] = []
        main = sys.modules.get("__main__")
        script = getattr(main, "__file__", None)
        if getattr(main, "__spec__", None) is None and script:
            # run as a script: see forkserver_preload.py for why workers must know its path
            os.environ["NNRESUME_PARENT_MAIN"] = os.path.normpath(script)

    def warm_up(self) -> None:
        """Starts the forkserver now; it imports nnunetv2 in the background until the first task needs it."""
        forkserver.ensure_running()

    def forkserver_pid(self) -> Optional[int]:
        return getattr(forkserver._forkserver, "_forkserver_pid", None)

    def overhead_pids(self) -> list[int]:
        """Processes whose whole RSS is the run's own: the forkserver (the orchestrator counts by its private
        memory, see `readings`)."""
        pid = self.forkserver_pid()
        return [pid] if pid else []

    def start_companion(self, kind: str, args: tuple[Any, ...],
                        on_exit: Optional[Callable[[Any], None]] = None) -> Any:
        """Starts a process beside the workers, forked from the same forkserver, that serves them rather than running
        tasks (prediction's device process: worker/inference/device.py); `kind` names its entry point in worker/run.py.
        Its memory counts as the run's own, as the forkserver's does. Should it end by itself, `on_exit(process)` is
        called from `poll` (in the caller's thread), and may start it again. Closing its pipe (`stop_companion`, or this
        process's death) tells it the run is over."""
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_companion_main, args=(child, kind, args),
                                    name=f"nnresume-{kind}-{next(self._ids)}", daemon=False)
        process.start()
        child.close()
        self._companions.append(_Companion(process, parent, on_exit))
        return process

    def stop_companion(self, process: Any) -> None:
        """Closes its pipe (it exits), kills it if it does not within a few seconds, and reaps it."""
        for c in [c for c in self._companions if c.process is process]:
            self._companions.remove(c)
            c.conn.close()
            c.process.join(5)
            if c.process.exitcode is None:
                c.process.kill()
                c.process.join()

    def _drain_companions(self) -> None:
        for c in self._companions:
            try:
                while c.conn.poll():
                    message = c.conn.recv()
                    if message[0] == "serving":
                        c.serving = message[1]
                    elif message[0] == "served":
                        c.serving = None
                        c.served_peaks[message[1]] = message[2]
                        if len(c.served_peaks) > 64:  # tasks whose worker died before it reported: never asked for
                            del c.served_peaks[next(iter(c.served_peaks))]
            except (EOFError, OSError):  # it ended: _check_companions deals with it
                c.serving = None

    def _check_companions(self) -> None:
        for c in [c for c in self._companions if c.process.exitcode is not None]:
            self._companions.remove(c)
            c.process.join()
            c.conn.close()
            if c.on_exit is not None:
                c.on_exit(c.process)

    def _busy(self) -> dict[str, _Worker]:
        return {w.task.task_id: w for w in self._workers if w.task is not None}

    def pids(self) -> dict[str, int]:
        return {t: w.process.pid for t, w in self._busy().items() if w.process.pid}

    def readings(self) -> Readings:
        # The orchestrator's and an idle worker's private memory count as the run's own (overhead); the pages the
        # orchestrator shares are libraries the forkserver maps too (counted in its RSS) or processes outside the run
        # do. So does a companion's, but for what it holds beyond its idle size while it serves a running task,
        # which is that task's.
        self._drain_companions()
        own = {f"idle-{w.process.pid}": w.process.pid for w in self._workers if w.task is None and w.process.pid}
        own["orchestrator"] = os.getpid()
        companions = {f"companion-{c.process.pid}": c for c in self._companions if c.process.pid}
        r = self.sampler.sample(self.overhead_pids(),
                                {**self.pids(), **own, **{k: c.process.pid for k, c in companions.items()}})
        overhead = r.overhead + sum(r.per_task.pop(k, 0) for k in own)
        for key, c in companions.items():
            private = r.per_task.pop(key, 0)
            if c.serving is not None and c.serving in r.per_task:
                base = private if c.idle_private is None else min(private, c.idle_private)
                r.per_task[c.serving] += private - base
                overhead += base
            else:
                c.idle_private = private
                overhead += private
        return Readings(r.tree, overhead, r.available, r.per_task)

    def private_peak(self, task_id: str, peak_rss: int) -> int:
        """A task's peak private memory: its worker's, and a companion's peak above its idle size while it served
        the task."""
        pid = self.pids().get(task_id)
        self._drain_companions()
        served = sum(c.served_peaks.pop(task_id, 0) for c in self._companions)
        return peak_rss - (self.sampler.shared_of(pid) if pid else 0) + served

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child,), name=f"nnresume-worker-{next(self._ids)}",
                                    daemon=False)
        process.start()
        child.close()
        w = _Worker(process, parent)
        self._workers.append(w)
        return w

    def submit(self, task: Any, estimate: int = 0) -> None:
        w = next((w for w in self._workers if w.task is None and w.process.exitcode is None), None) \
            or self._start_worker()
        w.task, w.finished, w.killed_by_us = task, False, False
        w.tasks_run += 1
        try:
            w.conn.send(task)
        except (BrokenPipeError, OSError):
            pass  # the worker died meanwhile: poll reports it as this task's death

    def enqueue(self, task: Any, estimate: int = 0) -> None:
        """Sends `task` now to a busy worker that will start it the moment it finishes its own (one in advance per
        worker, and none to a worker due to be retired); with no such worker, holds it until one frees."""
        w = next((w for w in self._workers if w.task is not None and w.next_task is None and not w.finished
                  and w.process.exitcode is None and w.tasks_run < self.max_tasks
                  and w.private <= self.retire_private), None)
        if w is None:
            self._queued.append(task)
            return
        w.next_task, w.cancel_next = task, False
        w.tasks_run += 1
        try:
            w.conn.send(task)
        except (BrokenPipeError, OSError):
            pass  # the worker died meanwhile: poll reports the task as taken back

    def kill(self, task_id: str) -> None:
        queued = next((t for t in self._queued if t.task_id == task_id), None)
        if queued is not None:
            self._queued.remove(queued)
            self._cancelled.append(task_id)
            return
        ahead = next((w for w in self._workers if w.next_task is not None and w.next_task.task_id == task_id), None)
        if ahead is not None:
            ahead.cancel_next = True  # it is in the worker's pipe: the worker is stopped when it begins it
            return
        w = self._busy().get(task_id)
        if w is not None and w.process.exitcode is None:
            w.killed_by_us = True
            try:
                w.process.kill()
            except (ProcessLookupError, OSError):
                pass

    def _drain(self, w: _Worker, events: list[Event]) -> None:
        while w.task is not None:
            if w.finished:
                if w.next_task is None:
                    return
                self._promote(w, events)  # the worker went straight on to the task it had been sent
                continue
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                return
            except Exception as e:  # a message cut off by the worker's death
                log.debug("unreadable message from %s: %s", w.task.task_id, e)
                return
            events.append(Received(w.task.task_id, msg))
            if isinstance(msg, (TaskFinished, TaskFailed)):
                w.finished = True

    def _promote(self, w: _Worker, events: list[Event]) -> None:
        events.append(Ended(w.task.task_id, None))
        w.task, w.next_task, w.finished, w.killed_by_us = w.next_task, None, False, False
        if w.cancel_next:  # taken back, but the worker has begun it: stopped now, reported as taken back
            w.cancel_next = False
            w.killed_by_us = True
            try:
                w.process.kill()
            except (ProcessLookupError, OSError):
                pass
            return
        events.append(Started(w.task.task_id))

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = [Ended(t, Death(exit_code=None, signal=None, killed_by_us=True))
                               for t in self._cancelled]
        self._cancelled.clear()
        if events:
            timeout = 0.0
        waitables = [w.process.sentinel for w in self._workers] + [w.conn for w in self._workers
                                                                    if w.task is not None and not w.finished]
        waitables += [c.process.sentinel for c in self._companions]
        if waitables:
            multiprocessing.connection.wait(waitables, timeout)
        else:
            time.sleep(timeout)
        self._check_companions()
        freed = 0  # workers that ran a task and now run none (idle, or gone)
        for w in list(self._workers):
            self._drain(w, events)
            if w.process.exitcode is not None:
                freed += w.task is not None
                self._gone(w, events)
            elif w.task is not None and w.finished:
                events.append(Ended(w.task.task_id, None))
                w.task = None
                freed += 1
                self._maybe_retire(w)
        while self._queued and freed > 0:  # the next task held here takes a freed worker
            task = self._queued.pop(0)
            self.submit(task)
            events.append(Started(task.task_id))
            freed -= 1
        return events

    def _gone(self, w: _Worker, events: list[Event]) -> None:
        """The worker process ended: if it was running a task that had not finished, that task died with it; a task
        sent in advance that it had not begun is reported as taken back."""
        w.process.join()
        self._drain(w, events)
        w.conn.close()
        self._workers.remove(w)
        if w.next_task is not None:
            events.append(Ended(w.next_task.task_id, Death(exit_code=None, signal=None, killed_by_us=True)))
        if w.task is None:
            return
        code = w.process.exitcode
        death = None
        if not w.finished:
            death = Death(exit_code=code if code is not None and code >= 0 else None,
                          signal=-code if code is not None and code < 0 else None, killed_by_us=w.killed_by_us)
        events.append(Ended(w.task.task_id, death))

    def _maybe_retire(self, w: _Worker) -> None:
        private = self.sampler.private_of(w.process.pid)
        w.private = private or 0
        if w.tasks_run >= self.max_tasks or private is None or private > self.retire_private:
            log.debug("retiring worker %s after %d task(s) (private memory %s)", w.process.pid, w.tasks_run, private)
            self._stop(w)

    def _stop(self, w: _Worker) -> None:
        try:
            w.conn.send(None)  # the worker's loop ends
        except (BrokenPipeError, OSError):
            pass
        w.process.join(5)
        if w.process.exitcode is None:
            w.process.kill()
            w.process.join()
        w.conn.close()
        self._workers.remove(w)

    def stop_all(self) -> None:
        """Kills and reaps every worker running a task (after an error or a signal); idle workers stay. Queued
        tasks are dropped."""
        self._queued.clear()
        self._cancelled.clear()
        busy = [w for w in self._workers if w.task is not None]
        for w in busy:
            self.kill(w.task.task_id)
        deadline = time.monotonic() + 10
        for w in busy:
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.conn.close()
            self._workers.remove(w)

    def shutdown(self) -> None:
        self.stop_all()
        for c in list(self._companions):
            self.stop_companion(c.process)
        for w in list(self._workers):
            self._stop(w)
        # Stop the forkserver now, so nothing of the run outlives it. It is killed rather than asked to stop: it
        # holds no state, and asking would wait for it to finish importing nnunetv2 (~2 s) when a run that had
        # nothing to do ends before the import does.
        pid = self.forkserver_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is not None:
            try:
                stop()  # closes its pipe and reaps it
            except (OSError, ChildProcessError):
                pass
