"""Deterministic crash points for crash-safety tests.

`NNRESUME_CRASH_AT=<point>[:<n>]` makes the process that reaches `<point>` for the n-th time (default 1) die there,
by default with SIGKILL, exactly as the OOM killer or `kill -9` would: nothing is cleaned up, nothing flushed. The
test then reruns the command and checks that nothing unverified was trusted.

Optional refinements:
    NNRESUME_CRASH_CASE=<case>     only while working on this case
    NNRESUME_CRASH_ONCE=<path>     only once across all processes (the first to create <path> dies)
    NNRESUME_CRASH_HOW=kill|segv|exit|memory
                                   SIGKILL (default), SIGSEGV, exit code 3 without a word, or raise MemoryError

The points, in the order a case meets them:
    staged                after a worker's files are written and checksummed in staging, before any rename
    between_renames       after the first of a case's files is moved into its configuration folder
    renamed               after all of a case's files are in place, before the group is made durable
    ledger_commit         inside the ledger transaction that marks the case done, before COMMIT
    group_files_synced    after the files of a group of finished cases are durable (syncfs), before the folders'
                          fsync and the group's ledger commit
    group_synced          after the group's files and folders are durable, before its ledger commit
    fingerprint_aggregate while dataset_fingerprint.json is being written (temporary file written, not renamed)
    plans_write           while the plans JSON is being written (temporary file written, not renamed)
    device_inference      in prediction's device process, a case's data received, before its inference

With no variable set, `reached()` costs one environment lookup.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "NNRESUME_CRASH_AT"
POINTS = ("staged", "between_renames", "renamed", "ledger_commit", "group_files_synced", "group_synced",
          "fingerprint_aggregate", "plans_write", "device_inference")

_counts: dict[str, int] = {}
_current_case: Optional[str] = None


def set_case(case: Optional[str]) -> None:
    """The case this process is working on, for NNRESUME_CRASH_CASE."""
    global _current_case
    _current_case = case


def start_task(case: Optional[str]) -> None:
    """A worker starts a task: `<point>:<n>` counts from here, as if each task ran in a process of its own."""
    _counts.clear()
    set_case(case)


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point, expected one of {', '.join(POINTS)}")
    return name, int(nth or 1)


def reached(point: str) -> None:
    """Dies here if `point` is the configured crash point and its conditions hold."""
    target = _target()
    if target is None or target[0] != point:
        return
    case = os.environ.get("NNRESUME_CRASH_CASE")
    if case and case != _current_case:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] < target[1]:
        return
    once = os.environ.get("NNRESUME_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    how = os.environ.get("NNRESUME_CRASH_HOW", "kill")
    if how == "memory":
        raise MemoryError(f"crash point {point}")
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSEGV if how == "segv" else signal.SIGKILL)
