"""What each run did: its record (command, arguments, host, versions, budget, how it ended), its attempts (one per
task started, with how it ended and the memory it took) and its memory samples, which `status` and `report` read.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update

from .core import LedgerCore
from .models import Attempt, MemorySample, Run, RunStatus
from .records import AttemptRecord, MemorySampleRecord, RunRecord


def _run(r: Run) -> RunRecord:
    return RunRecord(r.id, r.command, r.started_at, r.ended_at, r.status, r.end_reason, r.arguments, r.host, r.pid,
                     r.pid_started_at, r.nnunetv2_version, r.nnresume_version, r.workers, r.budget_bytes,
                     r.peak_tree_rss, r.log_file)


class RunHistory(LedgerCore):
    """Runs, their attempts and their memory samples."""

    # ---- runs --------------------------------------------------------------------------------------------------------

    def start_run(self, command: str, arguments: dict[str, Any], host: str, pid: int, pid_started_at: float | None,
                  nnunetv2_version: str, nnresume_version: str, log_file: str | None) -> int:
        with self._write() as s:
            run = Run(command=command, started_at=time.time(), status=RunStatus.running, arguments=arguments,
                      host=host, pid=pid, pid_started_at=pid_started_at, nnunetv2_version=nnunetv2_version,
                      nnresume_version=nnresume_version, log_file=log_file)
            s.add(run)
            s.flush()
            return run.id

    def update_run(self, run_id: int, **values: Any) -> None:
        with self._write() as s:
            s.execute(update(Run).where(Run.id == run_id).values(**values))

    def finish_run(self, run_id: int, status: RunStatus, reason: str | None, peak_tree_rss: int | None = None) -> None:
        values: dict[str, Any] = {"status": status, "end_reason": reason, "ended_at": time.time()}
        if peak_tree_rss is not None:
            values["peak_tree_rss"] = peak_tree_rss
        self.update_run(run_id, **values)

    def runs_in_state(self, status: RunStatus) -> list[RunRecord]:
        with self._session() as s:
            return [_run(r) for r in s.scalars(select(Run).where(Run.status == status).order_by(Run.id))]

    def last_run(self, command: str | None = None) -> RunRecord | None:
        with self._session() as s:
            q = select(Run).order_by(Run.id.desc()).limit(1)
            if command:
                q = q.where(Run.command == command)
            r = s.scalar(q)
            return _run(r) if r else None

    def last_run_with_work(self, command: str) -> RunRecord | None:
        """The newest run of `command` that attempted at least one task (a rerun with nothing to do has none)."""
        with self._session() as s:
            r = s.scalar(select(Run).where(Run.command == command, Run.id.in_(select(Attempt.run_id)))
                         .order_by(Run.id.desc()).limit(1))
            return _run(r) if r else None

    def get_run(self, run_id: int) -> RunRecord | None:
        with self._session() as s:
            r = s.get(Run, run_id)
            return _run(r) if r else None

    # ---- attempts and memory samples ---------------------------------------------------------------------------------

    def add_attempt(self, a: AttemptRecord) -> None:
        with self._write() as s:
            s.add(Attempt(run_id=a.run_id, case_name=a.case_name, stage=a.stage, targets=a.targets,
                          started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome, exit_code=a.exit_code,
                          signal=a.signal, peak_rss=a.peak_rss, last_rss=a.last_rss, estimate_bytes=a.estimate_bytes,
                          budget_bytes=a.budget_bytes, message=a.message, private_peak=a.private_peak))

    def attempts(self, run_id: int | None = None) -> list[AttemptRecord]:
        with self._session() as s:
            q = select(Attempt).order_by(Attempt.id)
            if run_id is not None:
                q = q.where(Attempt.run_id == run_id)
            return [AttemptRecord(a.run_id, a.case_name, a.stage, a.targets, a.started_at, a.ended_at, a.outcome,
                                  a.exit_code, a.signal, a.peak_rss, a.last_rss, a.estimate_bytes, a.budget_bytes,
                                  a.message, a.private_peak) for a in s.scalars(q)]

    def add_memory_samples(self, run_id: int, samples: list[MemorySampleRecord]) -> None:
        if not samples:
            return
        with self._write() as s:
            s.add_all([MemorySample(run_id=run_id, t=m.t, tree_rss=m.tree_rss, available=m.available,
                                    budget=m.budget, running=m.running) for m in samples])

    def memory_samples(self, run_id: int) -> list[MemorySampleRecord]:
        with self._session() as s:
            return [MemorySampleRecord(m.t, m.tree_rss, m.available, m.budget, m.running)
                    for m in s.scalars(select(MemorySample).where(MemorySample.run_id == run_id)
                                       .order_by(MemorySample.t))]
