"""What `status` and a run's summary read: counts per stage and state and the few rows `status` lists, read without
ORM objects; and SQLite's integrity check.
"""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select

from .core import LedgerCore
from .models import Attempt, Case, Fingerprint, Output, TaskState
from .records import StatusRows


class StatusQueries(LedgerCore):
    """Counts and the rows `status` shows."""

    def status_rows(self, idents: Sequence[str], run_id: int | None) -> StatusRows:
        """What `status` shows: one pass over the fingerprints and one over the outputs, in plain SQL without the
        columns' type processing (at 25,000 cases the scans of the outputs table and the decoding of their rows were
        most of `status`'s time), and case names only for the few cases it names."""
        failing = (TaskState.failed, TaskState.quarantined)
        done, wanted = TaskState.done.value, set(idents)
        with self.engine.connect() as s:
            r = StatusRows(n_cases=s.exec_driver_sql("SELECT count(*) FROM cases").scalar() or 0)
            for state, peak in s.exec_driver_sql("SELECT state, peak_rss FROM fingerprints"):
                r.fingerprint_counts[state] = r.fingerprint_counts.get(state, 0) + 1
                if state == done and peak:
                    r.fingerprint_peaks.append(peak)
            largest: dict[str, list[tuple[int, int]]] = {}
            complete: dict[int, int] = {}
            for ident, state, peak, duration, case_id in s.exec_driver_sql(
                    "SELECT data_identifier, state, peak_rss, duration_s, case_id FROM outputs"):
                counts = r.output_counts.setdefault(ident, {})
                counts[state] = counts.get(state, 0) + 1
                if state != done:
                    continue
                if peak:
                    r.output_peaks.setdefault(ident, []).append(peak)
                    top = largest.setdefault(ident, [])
                    if len(top) < 3 or peak > top[-1][0]:
                        top.append((peak, case_id))
                        top.sort(reverse=True)
                        del top[3:]
                if duration is not None:
                    r.output_durations.setdefault(ident, []).append(duration)
                if ident in wanted:
                    complete[case_id] = complete.get(case_id, 0) + 1
            ids = {case_id for top in largest.values() for _, case_id in top}
            names = {i: n for i, n in s.execute(select(Case.id, Case.name).where(Case.id.in_(ids)))} if ids else {}
            r.output_largest = {ident: [(peak, names[case_id]) for peak, case_id in top]
                                for ident, top in largest.items()}
            if wanted:
                r.cases_complete = sum(1 for n in complete.values() if n == len(wanted))
            r.fingerprint_failures = [tuple(row) for row in s.execute(
                select(Fingerprint.case_id, Case.name, Fingerprint.state, Fingerprint.error)
                .join(Case, Case.id == Fingerprint.case_id).where(Fingerprint.state.in_(failing)))]
            r.output_failures = [tuple(row) for row in s.execute(
                select(Output.case_id, Case.name, Output.data_identifier, Output.state, Output.error)
                .join(Case, Case.id == Output.case_id).where(Output.state.in_(failing)))]
            if run_id is not None:
                for stage, n, first in s.execute(select(Attempt.stage, func.count(), func.min(Attempt.started_at))
                                                 .where(Attempt.run_id == run_id, Attempt.outcome == "ok")
                                                 .group_by(Attempt.stage)):
                    r.ok_attempts[stage] = (n, first)
        return r

    def state_counts(self) -> dict[str, dict[str, int]]:
        """{"fingerprint": {state: n}, "<data_identifier>": {state: n}, ...}"""
        with self._session() as s:
            out: dict[str, dict[str, int]] = {}
            for state, n in s.execute(select(Fingerprint.state, func.count()).group_by(Fingerprint.state)):
                out.setdefault("fingerprint", {})[state.value] = n
            for ident, state, n in s.execute(select(Output.data_identifier, Output.state, func.count())
                                             .group_by(Output.data_identifier, Output.state)):
                out.setdefault(ident, {})[state.value] = n
            return out

    def integrity_check(self) -> str:
        with self.engine.connect() as c:
            return str(c.exec_driver_sql("PRAGMA integrity_check").scalar())
