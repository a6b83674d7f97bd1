"""The Dask worker's side of the Dask back end (dask.py): one Dask task runs one nnresume task in a child process.

Each Dask worker thread keeps its own `LocalPool` (local.py): long-lived child processes forked from a forkserver that
preloads nnunetv2, as on one machine. A case that crashes or is OOM-killed takes only its child with it: the Dask task
itself returns normally, with the child's messages and its `Death`, so Dask's own retries never see that death and
nnresume's ledger does (the coordinator retries with more room and quarantines after three, as on one machine).

A Dask worker process lost mid-task (SIGKILL, its node gone) is another matter: the scheduler re-runs its tasks on
other workers, which would hide the death. So a task first claims a marker file beside its staging folder (one per
task and attempt, on the shared file system); a second execution of the same task finds the marker, runs nothing,
and returns a death instead.

The coordinator's wishes reach a running task through Dask itself: a task whose future is cancelled (the coordinator
stopped it, or the coordinator is gone and the scheduler released its futures) is no longer `executing` on its
worker; the wrapper notices within `CHECK_EVERY` seconds and kills its child.

Durability: on one machine the coordinator syncs the staged files before it commits. Here the files were written on
another node, whose page cache the coordinator cannot flush: every staged file a result names, and its folder, is
fsynced here before the task returns.

Children of a Dask worker: a worker started by a nanny is a daemonic process, and multiprocessing refuses to start
children of daemonic processes. Start workers with `DASK_DISTRIBUTED__WORKER__DAEMON=False` (the README's recipe); a
worker that is daemonic anyway has the flag cleared here, for this process only. Its children die with it either way:
they die with their forkserver (PR_SET_PDEATHSIG), which exits when the worker process is gone.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Optional

from ...io import atomic
from ...tasks import DatasetResult, Death, FingerprintResult, OutputResult, TaskFailed
from .base import Ended, Received
from .local import LocalPool

CHECK_EVERY = 0.5  # seconds between checks that the task is still wanted
LOST = "lost with its Dask worker (the worker was killed, ran out of memory, or its node is gone)"
MARKER_SUFFIX = ".started"


@dataclass
class Outcome:
    """What a Dask task returns: the child's messages in order, and how the child ended (None: it said it finished)."""

    task_id: str
    messages: list[Any]
    death: Optional[Death]
    worker: str = ""  # the Dask worker's address
    host: str = ""
    shared: int = 0  # bytes of the child's peak RSS shared with its forkserver (not the task's own)


_thread = threading.local()
_running: dict[str, LocalPool] = {}  # task id -> the pool of the thread running it
_lock = threading.Lock()


def marker_path(staging: str) -> str:
    return staging + MARKER_SUFFIX


def _allow_children() -> None:
    process = multiprocessing.current_process()
    if process.daemon:
        # multiprocessing's own flag (Process.start asserts it is unset); see the module docstring
        process._config["daemon"] = False  # type: ignore[attr-defined]


def _pool() -> LocalPool:
    pool: Optional[LocalPool] = getattr(_thread, "pool", None)
    if pool is None:
        _allow_children()
        pool = _thread.pool = LocalPool()
    return pool


def _claim(marker: str, who: str) -> bool:
    """Creates the marker; False if it exists (this task and attempt ran before, on a worker that was lost)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, who.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic.fsync_dir(os.path.dirname(marker))
    return True


def _staged_paths(message: Any) -> list[str]:
    if isinstance(message, FingerprintResult) and message.result is not None:
        return [message.result.staged_path]
    if isinstance(message, OutputResult):
        return [f.staged_path for f in message.files]
    if isinstance(message, DatasetResult) and message.staged is not None:
        return [message.staged.staged_path]
    return []


def make_durable(messages: list[Any]) -> None:
    """fsyncs every staged file the messages name, then each folder that holds them."""
    folders = set()
    for m in messages:
        for path in _staged_paths(m):
            atomic.fsync_file(path)
            folders.add(os.path.dirname(path))
    for folder in sorted(folders):
        atomic.fsync_dir(folder)


def _still_wanted(worker: Any, key: Any) -> bool:
    if worker is None or key is None:
        return True
    ts = worker.state.tasks.get(key)
    return ts is not None and ts.state in ("executing", "long-running")


def _current() -> tuple[Any, Any]:
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker, worker.get_current_task()
    except (ImportError, ValueError):
        return None, None  # not in a Dask worker (a direct call)


def run_task(task: Any) -> Outcome:
    """The Dask task: runs `task` in this thread's child process; never raises for the case's own failure."""
    worker, key = _current()
    address = getattr(worker, "address", "") if worker is not None else ""
    host = socket.gethostname()
    staging_parent = os.path.dirname(task.staging)
    if not os.path.isdir(staging_parent):
        message = (f"case {task.case}: the Dask worker {address} on {host} cannot see the staging folder "
                   f"{staging_parent}")
        return Outcome(task.task_id, [TaskFailed(task.case, list(task.targets), "case", message, hint=SHARED_HINT)],
                       None, address, host)
    if not _claim(marker_path(task.staging), f"{address} {host} {os.getpid()}\n"):
        return Outcome(task.task_id, [], Death(None, extra={"how": LOST}), address, host)
    pool = _pool()
    messages: list[Any] = []
    death: Optional[Death] = None
    shared = 0
    with _lock:
        _running[task.task_id] = pool
    try:
        pool.submit(task, 0)
        ended = False
        while not ended:
            for event in pool.poll(CHECK_EVERY):
                if isinstance(event, Received):
                    messages.append(event.message)
                    peak = getattr(event.message, "peak_rss", None)
                    if peak:
                        shared = max(shared, peak - pool.private_peak(task.task_id, peak))
                elif isinstance(event, Ended) and event.task_id == task.task_id:
                    death, ended = event.death, True
            if not ended and not _still_wanted(worker, key):
                pool.kill(task.task_id)
    finally:
        with _lock:
            _running.pop(task.task_id, None)
    make_durable(messages)
    return Outcome(task.task_id, messages, death, address, host, shared)


def kill_task(task_id: str) -> bool:
    """Run on the workers through `Client.run`: kills the child running `task_id`, if it runs here."""
    with _lock:
        pool = _running.get(task_id)
    if pool is None:
        return False
    pool.kill(task_id)
    return True


def missing_paths(paths: list[str]) -> list[str]:
    """Run on the workers through `Client.run`: which of `paths` this worker cannot see as folders."""
    return [p for p in paths if not os.path.isdir(p)]


SHARED_HINT = ("every Dask worker must see nnUNet_raw and nnUNet_preprocessed at the same paths as the machine that "
               "runs nnresume (a shared file system)")

