"""Deterministic crash points for crash-safety tests.

`NNRESUME_CRASH_AT=<point>[:<n>]` makes the process that reaches `<point>` for the n-th time (default 1) kill itself
with SIGKILL, exactly as the OOM killer or `kill -9` would. Nothing is cleaned up, nothing is flushed: the test then
reruns the command and checks that nothing unverified was trusted.

The points, in the order a case meets them:
    staged                after a worker's files are written and fsynced in staging, before any rename
    between_renames       after the first of a case's files is moved into its configuration folder
    renamed               after all of a case's files are in place, before the ledger commit
    ledger_commit         inside the ledger transaction that marks the case done, before COMMIT
    fingerprint_aggregate while dataset_fingerprint.json is being written (temporary file written, not renamed)
    plans_write           while the plans JSON is being written (temporary file written, not renamed)

With no variable set, `reached()` costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "NNRESUME_CRASH_AT"
POINTS = ("staged", "between_renames", "renamed", "ledger_commit", "fingerprint_aggregate", "plans_write")

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point, expected one of {', '.join(POINTS)}")
    return name, int(nth or 1)


def reached(point: str) -> None:
    """Kills this process with SIGKILL if `point` is the configured crash point and its count is reached."""
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
