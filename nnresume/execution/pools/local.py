"""Local worker processes: one process per task, forked from a forkserver that has nnunetv2 imported.

Forking from a preloaded forkserver costs ~5 ms per task instead of the ~4 s a fresh interpreter spends importing
nnunetv2, so each case gets a clean process: its peak memory is its own, a crash or an OOM kill takes nothing else
with it, and there is no state to leak from one case to the next. The forkserver is started early so its import
overlaps the orchestrator's own work.

`LocalPool` implements the runner's `Pool` interface (base.py). It also measures memory: the tree of orchestrator,
forkserver and workers, each page once (memory.TreeSampler). How a worker ended is classified here: a message saying
it finished, an exit code, or a signal.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from typing import Any, Optional

from ...tasks import Death, TaskFailed, TaskFinished
from ..memory import Readings, TreeSampler
from .base import Ended, Event, Received

log = logging.getLogger(__name__)

PRELOAD = ["nnresume.execution.pools.forkserver_preload"]


@dataclass
class _Worker:
    task: Any
    process: Any
    conn: Any
    started: float
    finished: bool = False  # sent TaskFinished or TaskFailed
    killed_by_us: bool = False
    conn_open: bool = True


def _worker_main(conn: Any, task: Any) -> None:
    """Runs in the child. The import is free there (the forkserver preloaded it); keeping it out of the parent spares
    the orchestrator importing nnunetv2 on runs that only hash files."""
    from ...worker.run import worker_main

    worker_main(conn, task)


class LocalPool:
    def __init__(self, sampler: Optional[TreeSampler] = None) -> None:
        self.sampler = sampler or TreeSampler()
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._workers: dict[str, _Worker] = {}
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
        pid = self.forkserver_pid()
        return [os.getpid()] + ([pid] if pid else [])

    def readings(self) -> Readings:
        return self.sampler.sample(self.overhead_pids(), self.pids())

    def private_peak(self, task_id: str, peak_rss: int) -> int:
        pid = self.pids().get(task_id)
        return peak_rss - (self.sampler.shared_of(pid) if pid else 0)

    def submit(self, task: Any, estimate: int = 0) -> None:
        parent, child = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_worker_main, args=(child, task), name=f"nnresume-{task.case}",
                                    daemon=False)
        process.start()
        child.close()
        self._workers[task.task_id] = _Worker(task, process, parent, time.monotonic())

    def pids(self) -> dict[str, int]:
        return {t: w.process.pid for t, w in self._workers.items() if w.process.pid}

    def started_at(self, task_id: str) -> float:
        return self._workers[task_id].started

    def running(self) -> list[str]:
        return list(self._workers)

    def kill(self, task_id: str) -> None:
        w = self._workers.get(task_id)
        if w is not None and w.process.exitcode is None:
            w.killed_by_us = True
            try:
                w.process.kill()
            except (ProcessLookupError, OSError):
                pass

    def _drain(self, task_id: str, w: _Worker, events: list[Event]) -> None:
        while w.conn_open:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                w.conn_open = False
                return
            except Exception as e:  # a message cut off by the worker's death
                log.debug("unreadable message from %s: %s", task_id, e)
                w.conn_open = False
                return
            if isinstance(msg, (TaskFinished, TaskFailed)):
                w.finished = True
            events.append(Received(task_id, msg))

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        if not self._workers:
            time.sleep(timeout)
            return events
        waitables = []
        for w in self._workers.values():
            if w.conn_open:
                waitables.append(w.conn)
            waitables.append(w.process.sentinel)
        multiprocessing.connection.wait(waitables, timeout)
        for task_id, w in list(self._workers.items()):
            self._drain(task_id, w, events)
            if w.process.exitcode is None:
                continue
            w.process.join()
            self._drain(task_id, w, events)
            w.conn.close()
            code = w.process.exitcode
            death = None
            if not (w.finished and code == 0):
                death = Death(exit_code=code if code is not None and code >= 0 else None,
                              signal=-code if code is not None and code < 0 else None,
                              killed_by_us=w.killed_by_us)
            del self._workers[task_id]
            events.append(Ended(task_id, death))
        return events

    def stop_all(self) -> None:
        """Kills and reaps every running worker (after an error or a signal); the forkserver stays."""
        for task_id in list(self._workers):
            self.kill(task_id)
        deadline = time.monotonic() + 10
        for w in list(self._workers.values()):
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.conn.close()
        self._workers.clear()

    def shutdown(self) -> None:
        self.stop_all()
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
