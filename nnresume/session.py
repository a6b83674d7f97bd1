"""A run session: what every command that writes a ledger does around its own work.

Take the folder's lock (a second run refuses, naming the first), open and upgrade the ledger, record earlier runs
that died without closing their record as interrupted, open this run's record and its log file, clear the staging
folder (the lock is ours, so nothing else writes there) and put back to pending what a killed run left running.
Afterwards, however the work ended: close the record with a status and a reason, remove this run's staging folder,
release the lock. How it ended decides the exit code (errors.py): a signal gives 130/143 and is not an error, a full
disk becomes a DiskFullError with a hint, any other NnresumeError keeps its own code, and anything else is an
internal error (1) whose traceback goes to the run's log.

The work itself (the preprocessing stages, prediction) runs inside `with run_session(...) as session:` and sets
`session.outcome` when it finishes; nothing here knows what a case is. `log_summary` tells the user how it ended.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sqlalchemy.exc import OperationalError

from . import __version__
from .config import format_bytes
from .dataset import nnunetv2_version
from .errors import EXIT_CASES_FAILED, EXIT_ERROR, DiskFullError, Interrupted, NnresumeError
from .io.lock import DatasetLock, process_started_at
from .ledger.models import RunStatus
from .ledger.repository import Ledger
from .progress import add_run_log, remove_handler

log = logging.getLogger(__name__)

FREE_SPACE_HINT = "free some space and run the same command again"


@dataclass
class Outcome:
    """How one run ended, for the summary (`log_summary`) and the exit code."""

    name: str
    status: RunStatus = RunStatus.running
    exit_code: int = EXIT_ERROR
    reason: Optional[str] = None
    run_id: Optional[int] = None
    log_file: Optional[str] = None
    duration_s: float = 0.0
    budget: Optional[int] = None
    peak_tree: Optional[int] = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # errors no case owns (dataset.json's numTraining)
    warnings: list[str] = field(default_factory=list)


def log_summary(o: Outcome) -> None:
    """The end-of-run summary: how the run ended, counts per stage, peak memory against the budget, what failed and
    what to do next."""
    counts = o.counts or {}
    parts = []
    for stage, c in counts.items():
        parts.append(f"{stage}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    log.info("%s: %s in %.1f s", o.name, o.status.value.replace("_", " "), o.duration_s)
    for p in parts:
        log.info("  %s", p)
    if o.peak_tree:
        log.info("  peak memory of the process tree %s (budget %s)", format_bytes(o.peak_tree),
                 format_bytes(o.budget))
        if o.budget and o.peak_tree > o.budget:
            log.warning("  the process tree went past the budget (%s over): a case allowed past it "
                        "(--allow-oversize), or memory held outside any case", format_bytes(o.peak_tree - o.budget))
    if o.problems:
        log.warning("  dataset problems:")
        for line in o.problems:
            log.warning("    %s", line)
    if o.failures:
        log.warning("  failed or quarantined:")
        for line in o.failures:
            log.warning("    %s", line)
    if o.warnings:
        log.warning("  warnings (preprocessed as nnU-Net would; --strict fails these cases):")
        for line in o.warnings[:20]:
            log.warning("    %s", line)
        if len(o.warnings) > 20:
            log.warning("    ... and %d more (nnresume status -d %s)", len(o.warnings) - 20, o.name)
    if o.status.value == "interrupted":
        log.warning("  %s. Run the same command again to resume; finished cases are kept.", o.reason)
    elif o.exit_code == EXIT_CASES_FAILED:
        log.warning("  fix the inputs named above and run the same command again: those cases are redone, and any "
                    "others whose configuration their return changes")


@dataclass
class Session:
    """What the work inside a session uses: the ledger, this run's id and staging folder, and its outcome."""

    name: str
    ledger: Ledger
    run_id: int
    staging: Path
    outcome: Outcome
    peak_tree: int = 0


def close_abandoned_runs(ledger: Ledger) -> None:
    """We hold the lock, so every run still marked running is dead."""
    for r in ledger.runs_in_state(RunStatus.running):
        reason = f"process gone (PID {r.pid} on {r.host}); it was killed or the machine stopped"
        ledger.finish_run(r.id, RunStatus.interrupted, reason)
        log.warning("The previous run %d (started %s) was interrupted: %s. Resuming.", r.id,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)), reason)


@contextlib.contextmanager
def run_session(name: str, ledger_path: Path, work: Path, command: str, arguments: dict[str, Any],
                **run_details: Any) -> Iterator[Session]:
    """The lock, ledger and run record around one run's work (see the module docstring). `work` holds the lock,
    the logs and the staging folder; `run_details` go into the run's record (workers, budget_bytes)."""
    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    lock = DatasetLock(work / "lock", name)
    lock.acquire()
    outcome = Outcome(name)
    log_handler: Optional[logging.Handler] = None
    session: Optional[Session] = None
    try:
        ledger = Ledger.open(str(ledger_path))
        close_abandoned_runs(ledger)
        run_id = ledger.start_run(command, {"argv": sys.argv[1:], **arguments}, socket.gethostname(), os.getpid(),
                                  process_started_at(os.getpid()), nnunetv2_version(), __version__, None)
        outcome.run_id = run_id
        log_path = work / "logs" / f"run-{run_id}.log"
        log_handler = add_run_log(log_path)
        outcome.log_file = str(log_path)
        ledger.update_run(run_id, log_file=str(log_path), **run_details)
        shutil.rmtree(work / "staging", ignore_errors=True)
        staging = work / "staging" / f"run-{run_id}"
        staging.mkdir(parents=True, exist_ok=True)
        session = Session(name, ledger, run_id, staging, outcome)
        reset = ledger.reset_running()
        if reset:
            log.info("%d task(s) left running by the interrupted run will be redone", reset)
        with _disk_full_as_error(ledger_path):
            try:
                yield session
            except Interrupted as e:
                outcome.status, outcome.exit_code, outcome.reason = RunStatus.interrupted, e.exit_code, e.message
    except NnresumeError as e:
        outcome.status, outcome.exit_code, outcome.reason = RunStatus.failed, e.exit_code, e.message
        raise
    except BaseException as e:
        outcome.status, outcome.exit_code = RunStatus.failed, EXIT_ERROR
        outcome.reason = f"internal error: {type(e).__name__}: {e}"
        log.debug("%s", traceback.format_exc())
        raise
    finally:
        if session is not None:
            _close(session)
        outcome.duration_s = time.time() - t0
        remove_handler(log_handler)
        lock.release()


@contextlib.contextmanager
def _disk_full_as_error(ledger_path: Path) -> Iterator[None]:
    """ENOSPC from a file write, or SQLite's 'disk is full', becomes one clear error."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {e.filename or ledger_path.parent}",
                                FREE_SPACE_HINT) from e
        raise
    except OperationalError as e:
        if "disk is full" in str(e.orig):
            raise DiskFullError(f"no space left on device writing the ledger {ledger_path}", FREE_SPACE_HINT) from e
        raise


def _close(session: Session) -> None:
    shutil.rmtree(session.staging, ignore_errors=True)
    outcome = session.outcome
    outcome.peak_tree = session.peak_tree or None
    try:
        session.ledger.finish_run(session.run_id, outcome.status, outcome.reason, session.peak_tree or None)
        outcome.counts = session.ledger.state_counts()
    except Exception as e:  # e.g. the disk is still full: the next run records this one as interrupted
        log.warning("could not record the end of run %d in the ledger: %s", session.run_id, getattr(e, "orig", e))
    finally:
        session.ledger.close()
