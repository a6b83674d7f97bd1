"""Deterministic crash points for crash-safety tests.

`NNRESUME_CRASH_AT=<point>[:<n>]` makes the process that reaches `<point>` for the n-th time (default 1) die there,
by default with SIGKILL, exactly as the OOM killer or `kill -9` would: nothing is cleaned up, nothing flushed. The
test then reruns the command and checks that nothing unverified was trusted.

Optional refinements:
    NNRESUME_CRASH_CASE=<case>     only while working on this case; `<case>/<stage>` only in that stage's task
                                   (`small_0003/preprocess`); dataset-level steps are the case `(dataset)`
    NNRESUME_CRASH_ONCE=<path>     only once across all processes (the first to create <path> dies; the file holds
                                   its pid)
    NNRESUME_CRASH_HOW=kill|segv|exit|memory|pause:<seconds>
                                   SIGKILL (default), SIGSEGV, exit code 3 without a word, raise MemoryError, or
                                   sleep that long and go on (a case that takes long, for tests that act while it
                                   runs: with NNRESUME_CRASH_ONCE the file exists, holding the pid, while it sleeps)

Several crash points, so that one run meets several deaths (on different cases, or of different kinds): specs
separated by commas, each `<point>[:<n>][@<case>][=<how>[*]]`, e.g.
`staged@small_0003=kill,staged@small_0004=segv,staged:2@small_0001/preprocess`. What a spec does not say comes from
the variables above; with NNRESUME_CRASH_ONCE the i-th spec's file is `<path>.<i>`, and a `*` after the way to crash
makes that spec crash every time all the same (a case that never gets through).

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
import time
from dataclasses import dataclass
from typing import Optional

ENV = "NNRESUME_CRASH_AT"
POINTS = ("staged", "between_renames", "renamed", "ledger_commit", "group_files_synced", "group_synced",
          "fingerprint_aggregate", "plans_write", "device_inference")
HOWS = ("kill", "segv", "exit", "memory", "pause")


@dataclass(frozen=True)
class Spec:
    point: str
    nth: int
    case: Optional[str]
    stage: Optional[str]
    how: str
    once: Optional[str]


_counts: dict[int, int] = {}
_current_case: Optional[str] = None
_current_stage: Optional[str] = None
_parsed: tuple[str, tuple[Spec, ...]] = ("", ())


def set_case(case: Optional[str], stage: Optional[str] = None) -> None:
    """The case (and stage) this process is working on, for NNRESUME_CRASH_CASE."""
    global _current_case, _current_stage
    _current_case, _current_stage = case, stage


def start_task(case: Optional[str], stage: Optional[str] = None) -> None:
    """A worker starts a task: `<point>:<n>` counts from here, as if each task ran in a process of its own."""
    _counts.clear()
    set_case(case, stage)


def _parse_one(text: str, index: int, several: bool) -> Spec:
    rest, _, how = text.partition("=")
    rest, _, case = rest.partition("@")
    name, _, nth = rest.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={text!r}: unknown crash point, expected one of {', '.join(POINTS)}")
    case = case or os.environ.get("NNRESUME_CRASH_CASE") or ""
    case, _, stage = case.partition("/")
    every_time = how.endswith("*")
    how = how.rstrip("*") or os.environ.get("NNRESUME_CRASH_HOW", "kill")
    if how.partition(":")[0] not in HOWS:
        raise ValueError(f"{ENV}={text!r}: unknown way to crash {how!r}, expected one of {', '.join(HOWS)}")
    once = None if every_time else os.environ.get("NNRESUME_CRASH_ONCE") or None
    if once and several:
        once = f"{once}.{index}"
    return Spec(name, int(nth or 1), case or None, stage or None, how, once)


def _specs() -> tuple[Spec, ...]:
    global _parsed
    text = os.environ.get(ENV, "")
    if text != _parsed[0]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        _parsed = (text, tuple(_parse_one(p, i, len(parts) > 1) for i, p in enumerate(parts)))
    return _parsed[1]


def reached(point: str) -> None:
    """Dies (or pauses) here if `point` is a configured crash point and its conditions hold."""
    if not os.environ.get(ENV):
        return
    for i, spec in enumerate(_specs()):
        if spec.point != point or (spec.case and spec.case != _current_case) or \
                (spec.stage and spec.stage != _current_stage):
            continue
        _counts[i] = _counts.get(i, 0) + 1
        if _counts[i] < spec.nth:
            continue
        if spec.once:
            try:
                fd = os.open(spec.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        _crash(spec.how, point)


def _crash(how: str, point: str) -> None:
    kind, _, seconds = how.partition(":")
    if kind == "pause":
        time.sleep(float(seconds or 5))
        return
    if kind == "memory":
        raise MemoryError(f"crash point {point}")
    if kind == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSEGV if kind == "segv" else signal.SIGKILL)
