"""Named ledger operations. Each is one transaction and returns plain dataclasses, never ORM objects.

Only the orchestrator process calls the writing operations. The one that makes an output real is `output_done`:
its commit is the moment a case's files in a configuration folder become trusted.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from sqlalchemy import Engine, Text, delete, func, insert, select, type_coerce, update
from sqlalchemy.orm import Session

from ..io import crashpoints
from ..tasks import InputFileInfo
from . import engine as engine_mod
from .models import (
    Artifact,
    Attempt,
    Case,
    Configuration,
    Finding,
    Fingerprint,
    InputFile,
    MemorySample,
    Output,
    Run,
    RunStatus,
    TaskState,
)


@dataclass
class FingerprintRecord:
    state: TaskState
    key: Optional[str]
    input_digest: Optional[str]
    result_file: Optional[str]
    result_size: Optional[int]
    result_sha256: Optional[str]
    shape_after_crop: Optional[list[Any]]
    spacing: Optional[list[Any]]
    attempts: int
    deaths: int
    duration_s: Optional[float]
    peak_rss: Optional[int]
    estimate_bytes: Optional[int]
    error: Optional[str]
    attempt_key: Optional[str] = None


@dataclass
class OutputRecord:
    case: str
    data_identifier: str
    configuration: str
    state: TaskState
    config_hash: Optional[str]
    input_digest: Optional[str]
    files: Optional[list[dict[str, Any]]]
    attempts: int
    deaths: int
    duration_s: Optional[float]
    peak_rss: Optional[int]
    estimate_bytes: Optional[int]
    error: Optional[str]
    updated_at: float


@dataclass
class CaseRecord:
    name: str
    input_digest: Optional[str]
    header: Optional[dict[str, Any]]
    files: list[InputFileInfo] = field(default_factory=list)
    fingerprint: Optional[FingerprintRecord] = None
    outputs: dict[str, OutputRecord] = field(default_factory=dict)


@dataclass
class RunRecord:
    id: int
    command: str
    started_at: float
    ended_at: Optional[float]
    status: RunStatus
    end_reason: Optional[str]
    arguments: dict[str, Any]
    host: str
    pid: int
    pid_started_at: Optional[float]
    nnunetv2_version: str
    nnresume_version: str
    workers: Optional[int]
    budget_bytes: Optional[int]
    peak_tree_rss: Optional[int]
    log_file: Optional[str]


@dataclass
class ArtifactRecord:
    name: str
    key: str
    size: int
    sha256: str
    details: Optional[dict[str, Any]]
    updated_at: float


@dataclass
class ConfigurationRecord:
    data_identifier: str
    configuration: str
    plans_identifier: str
    config_hash: str
    # the hash outputs were keyed on before (dataset.earlier_config_hash), computed from the current plans; not stored
    earlier_hash: Optional[str] = None

    def keys(self) -> tuple[str, ...]:
        """The config hashes an output may be keyed on to be up to date."""
        return (self.config_hash,) if self.earlier_hash is None else (self.config_hash, self.earlier_hash)


@dataclass
class AttemptRecord:
    run_id: int
    case_name: str
    stage: str
    targets: list[str]
    started_at: float
    ended_at: float
    outcome: str
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    peak_rss: Optional[int] = None
    last_rss: Optional[int] = None
    estimate_bytes: Optional[int] = None
    budget_bytes: Optional[int] = None
    message: Optional[str] = None
    private_peak: Optional[int] = None


@dataclass
class StatusRows:
    """Counts and the few rows `status` lists (see Ledger.status_rows)."""

    n_cases: int
    fingerprint_counts: dict[str, int] = field(default_factory=dict)
    fingerprint_peaks: list[int] = field(default_factory=list)
    output_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    output_peaks: dict[str, list[int]] = field(default_factory=dict)
    output_largest: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # the 3 largest peaks, case
    output_durations: dict[str, list[float]] = field(default_factory=dict)
    fingerprint_failures: list[tuple[Any, ...]] = field(default_factory=list)  # (case id, name, state, error)
    output_failures: list[tuple[Any, ...]] = field(default_factory=list)  # (case id, name, ident, state, error)
    cases_complete: int = 0  # cases done in every data folder asked for
    ok_attempts: dict[str, tuple[int, float]] = field(default_factory=dict)  # stage -> (count, first start)


@dataclass
class FindingRecord:
    case: Optional[str]  # None: the dataset as a whole
    level: str  # "warning" or "error"
    kind: str
    path: Optional[str]
    message: str


@dataclass
class MemorySampleRecord:
    t: float
    tree_rss: int
    available: int
    budget: int
    running: int




def _run(r: Run) -> RunRecord:
    return RunRecord(r.id, r.command, r.started_at, r.ended_at, r.status, r.end_reason, r.arguments, r.host, r.pid,
                     r.pid_started_at, r.nnunetv2_version, r.nnresume_version, r.workers, r.budget_bytes,
                     r.peak_tree_rss, r.log_file)


def _text(column: Any) -> Any:
    """A JSON column as the text SQLite holds, for `_json_each`."""
    return type_coerce(column, Text)


def _json_each(texts: Iterable[Optional[str]]) -> list[Any]:
    """The values of JSON texts (NULL as None), decoded by one json.loads: at 25,000 cases a rerun reads 125,000
    of them, and a call each cost 1.5 s."""
    return json.loads("[" + ",".join("null" if t is None else t for t in texts) + "]")


class _GroupRow:
    """A fingerprint or output row while writes are grouped: its primary key, the two counters the operations read
    back (attempts, deaths) and the values set since the last commit, which `commit_group` writes with one
    executemany per table. A plain object, not an ORM instance: the ORM's were ~3 KB a row, 80-140 MiB of the
    orchestrator's memory at 25,000 cases. A value set is readable until the commit; after it only the counters."""

    __slots__ = ("_model", "_pk", "_attempts", "_deaths", "_changed", "_new")

    def __init__(self, model: type[Fingerprint] | type[Output], pk: int, attempts: int, deaths: int,
                 changed: Optional[dict[str, Any]] = None) -> None:
        for name, value in (("_model", model), ("_pk", pk), ("_attempts", attempts), ("_deaths", deaths),
                            ("_changed", changed), ("_new", changed is not None)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only for names that are not slots
        if self._changed is not None and name in self._changed:
            return self._changed[name]
        if name in ("attempts", "deaths"):
            return self._attempts if name == "attempts" else self._deaths
        raise AttributeError(f"{name} of a grouped {self._model.__tablename__} row is not loaded")

    def __setattr__(self, name: str, value: Any) -> None:
        if self._changed is None:
            object.__setattr__(self, "_changed", {})
        self._changed[name] = value

    def pending(self) -> Optional[tuple[bool, dict[str, Any]]]:
        """(is new, values with the primary key) to write, or None."""
        if not self._changed:
            return None
        key = "case_id" if self._model is Fingerprint else "id"
        return self._new, {key: self._pk, **self._changed}

    def committed(self) -> None:
        changed = self._changed or {}
        object.__setattr__(self, "_attempts", changed.get("attempts", self._attempts))
        object.__setattr__(self, "_deaths", changed.get("deaths", self._deaths))
        object.__setattr__(self, "_changed", None)
        object.__setattr__(self, "_new", False)


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._case_ids: dict[str, int] = {}
        self._grouping = False
        self._group: Optional[Session] = None  # one session from start_group to end_group, committed many times
        self._dirty = False  # the group session holds writes not yet committed
        self.group_opened = 0.0  # time.monotonic() of the first write since the last commit
        # While grouping, the fingerprint and output rows by (kind, case id, data identifier), each kind loaded with
        # one query when first needed: a task's rows are found without a query (and without the flush of everything
        # pending that a query would cost first). They stay loaded for the whole stage: this process is the
        # ledger's only writer. `_touched` holds the rows written since the last commit.
        self._rows: dict[tuple[str, int, str], _GroupRow] = {}
        self._loaded: set[str] = set()
        self._touched: dict[int, _GroupRow] = {}
        self._touched_cases: set[int] = set()
        # While grouping, case-level writes wait for the commit and go in one statement each: the latest values per
        # case (input digest, header) and the latest input-file list per case.
        self._case_updates: dict[int, dict[str, Any]] = {}
        self._file_writes: dict[int, list[InputFileInfo]] = {}
        self._found_in: Optional[set[int | None]] = None

    # ---- writing: one transaction per operation, or a group of operations committed together -------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        if not self._grouping:
            with self._session() as s, s.begin():
                yield s
            return
        if self._group is None:
            self._group = self._session()
        if not self._dirty:
            self._dirty = True
            self.group_opened = time.monotonic()
        yield self._group

    def start_group(self) -> None:
        """From now until `end_group`, writes join one transaction that `commit_group` commits: tasks that finish
        close together cost one commit (and one fsync of the ledger) instead of one each."""
        self._grouping = True

    @property
    def group_pending(self) -> bool:
        return self._dirty

    def case_pending(self, name: str) -> bool:
        """Whether the case's fingerprint or output rows have writes the group has not committed yet (outside a
        group every write is committed at once)."""
        if not self._grouping:
            return False
        case_id = self._case_ids.get(name)
        return case_id is None or case_id in self._touched_cases

    def commit_group(self) -> None:
        group = self._group
        if group is None or not self._dirty:
            return
        try:
            self._write_deferred(group)
            group.commit()
            for row in self._touched.values():
                row.committed()
            self._touched.clear()
            self._touched_cases.clear()
            self._dirty = False
        except BaseException:
            self._drop_group()
            self._case_ids.clear()  # what the rolled-back transaction created is gone
            self._found_in = None
            raise

    def _write_deferred(self, s: Session) -> None:
        updates, self._case_updates = self._case_updates, {}
        files, self._file_writes = self._file_writes, {}
        if updates:
            s.execute(update(Case), [{"id": case_id, **values} for case_id, values in updates.items()])
        ids = list(files)
        for i in range(0, len(ids), 500):
            s.execute(delete(InputFile).where(InputFile.case_id.in_(ids[i:i + 500])))
        rows = [{"case_id": case_id, "role": f.role, "channel": f.channel, "path": f.path, "size": f.size,
                 "mtime_ns": f.mtime_ns, "digest": f.digest} for case_id, fs in files.items() for f in fs]
        if rows:
            s.execute(insert(InputFile), rows)
        batches: dict[tuple[Any, bool, tuple[str, ...]], list[dict[str, Any]]] = {}
        for row in self._touched.values():
            pending = row.pending()
            if pending is not None:
                new, values = pending
                batches.setdefault((row._model, new, tuple(sorted(values))), []).append(values)
        for (model, new, _), values_list in sorted(batches.items(), key=lambda kv: not kv[0][1]):  # inserts first
            s.execute(insert(model) if new else update(model), values_list)

    def _drop_group(self) -> None:
        self._case_updates.clear()
        self._file_writes.clear()
        group, self._group = self._group, None
        self._dirty = False
        self._rows.clear()
        self._loaded.clear()
        self._touched.clear()
        self._touched_cases.clear()
        if group is not None:
            group.rollback()
            group.close()

    def end_group(self) -> None:
        try:
            self.commit_group()
        finally:
            self._grouping = False
            self._drop_group()  # nothing is pending any more: the rollback only ends the session

    @classmethod
    def open(cls, path: str, create: bool = True) -> Ledger:
        return cls(engine_mod.open_engine(path, create=create))

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _case_id(self, s: Session, name: str) -> int:
        case_id = self._case_ids.get(name)
        if case_id is None:
            case_id = s.scalar(select(Case.id).where(Case.name == name))
            if case_id is None:
                case = Case(name=name, updated_at=time.time())
                s.add(case)
                s.flush()
                case_id = case.id
            self._case_ids[name] = case_id
        return case_id

    # ---- runs -------------------------------------------------------------------------------------------------

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

    # ---- cases ------------------------------------------------------------------------------------------------

    def load_cases(self) -> dict[str, CaseRecord]:
        """Every case with its files, fingerprint and outputs: four plain SELECTs, no ORM objects (a rerun of
        thousands of cases reads this once; building ORM instances for it cost ~0.3 s per thousand cases)."""
        fp_cols = [getattr(Fingerprint, f) for f in ("case_id", "state", "key", "input_digest", "result_file",
                                                     "result_size", "result_sha256")]
        fp_rest = [getattr(Fingerprint, f) for f in ("attempts", "deaths", "duration_s", "peak_rss",
                                                     "estimate_bytes", "error", "attempt_key")]
        out_cols = [getattr(Output, f) for f in ("case_id", "data_identifier", "configuration", "state",
                                                 "config_hash", "input_digest")]
        out_rest = [getattr(Output, f) for f in ("attempts", "deaths", "duration_s", "peak_rss", "estimate_bytes",
                                                 "error", "updated_at")]
        with self.engine.connect() as s:  # Core rows: the ORM's result handling doubled the time at 25,000 cases
            by_id: dict[int, CaseRecord] = {}
            case_rows = s.execute(select(Case.id, Case.name, Case.input_digest, _text(Case.header))).all()
            for (case_id, name, digest, _), header in zip(case_rows, _json_each(r[3] for r in case_rows)):
                by_id[case_id] = CaseRecord(name=name, input_digest=digest, header=header)
                self._case_ids[name] = case_id
            for case_id, role, channel, path, size, mtime, digest in s.execute(
                    select(InputFile.case_id, InputFile.role, InputFile.channel, InputFile.path, InputFile.size,
                           InputFile.mtime_ns, InputFile.digest).order_by(InputFile.id)):
                by_id[case_id].files.append(InputFileInfo(role, channel, path, size, mtime, digest))
            rows: Sequence[Any] = cast(Sequence[Any], s.execute(select(
                *fp_cols, _text(Fingerprint.shape_after_crop), _text(Fingerprint.spacing), *fp_rest)).all())
            shapes, spacings = _json_each(r[7] for r in rows), _json_each(r[8] for r in rows)
            for row, shape, spacing in zip(rows, shapes, spacings):
                by_id[row[0]].fingerprint = FingerprintRecord(*(row[1:7] + (shape, spacing) + row[9:]))
            rows = cast(Sequence[Any], s.execute(select(*out_cols, _text(Output.files), *out_rest)).all())
            for row, files in zip(rows, _json_each(r[6] for r in rows)):
                rec = by_id[row[0]]
                rec.outputs[row[1]] = OutputRecord(*((rec.name,) + row[1:6] + (files,) + row[7:]))
            return {r.name: r for r in by_id.values()}

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

    def remove_cases(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        with self._write() as s:
            s.execute(delete(Case).where(Case.name.in_(names)))
        for n in names:
            self._case_ids.pop(n, None)

    def _ensure_cases(self, s: Session, names: Iterable[str]) -> None:
        """Rows for cases the ledger does not know yet, in one INSERT (one flush per new case, as `_case_id` does,
        grows with the session: quadratic over 25,000 cases)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._case_ids]
        if not missing:
            return
        self._case_ids.update({n: i for i, n in s.execute(select(Case.id, Case.name))})
        missing = [n for n in missing if n not in self._case_ids]
        if missing:
            now = time.time()
            s.execute(insert(Case), [{"name": n, "updated_at": now} for n in missing])
            self._case_ids.update({n: i for i, n in s.execute(select(Case.id, Case.name))})

    def set_case_headers(self, headers: dict[str, dict[str, Any] | None]) -> None:
        with self._write() as s:
            self._ensure_cases(s, headers)
            s.execute(update(Case), [{"id": self._case_ids[n], "header": h} for n, h in headers.items()])


    def _write_files(self, s: Session, case_id: int, files: Sequence[InputFileInfo]) -> None:
        if s is self._group:
            self._file_writes[case_id] = list(files)
            return
        s.execute(delete(InputFile).where(InputFile.case_id == case_id))
        for f in files:
            s.add(InputFile(case_id=case_id, role=f.role, channel=f.channel, path=f.path, size=f.size,
                            mtime_ns=f.mtime_ns, digest=f.digest))

    # ---- fingerprint stage ------------------------------------------------------------------------------------

    def _fingerprint_row(self, s: Session, name: str) -> Fingerprint | _GroupRow:
        case_id = self._case_id(s, name)
        if s is self._group:
            self._load_rows(s, "f")
            row = self._rows.get(("f", case_id, ""))
            if row is None:
                row = self._rows["f", case_id, ""] = _GroupRow(Fingerprint, case_id, 0, 0, {
                    "state": TaskState.pending, "attempts": 0, "deaths": 0, "updated_at": time.time()})
            self._touched[id(row)] = row
            self._touched_cases.add(case_id)
            return row
        fp = s.get(Fingerprint, case_id)
        if fp is None:
            fp = Fingerprint(case_id=case_id, state=TaskState.pending, attempts=0, deaths=0, updated_at=time.time())
            s.add(fp)
        return fp

    def _load_rows(self, s: Session, kind: str) -> None:
        """Loads the keys and counters of every fingerprint ("f") or output ("o") row, once per group."""
        if kind in self._loaded:
            return
        with s.no_autoflush:
            if kind == "f":
                for case_id, attempts, deaths in s.execute(select(Fingerprint.case_id, Fingerprint.attempts,
                                                                  Fingerprint.deaths)):
                    self._rows["f", case_id, ""] = _GroupRow(Fingerprint, case_id, attempts, deaths)
            else:
                for pk, case_id, ident, attempts, deaths in s.execute(select(
                        Output.id, Output.case_id, Output.data_identifier, Output.attempts, Output.deaths)):
                    self._rows["o", case_id, ident] = _GroupRow(Output, pk, attempts, deaths)
        self._loaded.add(kind)

    def fingerprint_started(self, name: str, run_id: int, estimate: int | None, attempt_key: str | None = None) -> None:
        with self._write() as s:
            fp = self._fingerprint_row(s, name)
            fp.attempt_key = attempt_key
            # run_id names the run that made the current result, so it is set on completion, not here
            fp.state, fp.estimate_bytes, fp.updated_at = TaskState.running, estimate, time.time()
            fp.attempts += 1

    def fingerprint_unchanged(self, name: str, files: Sequence[InputFileInfo]) -> None:
        """The case's files were touched but hash as before: keep the result, record the new stats."""
        with self._write() as s:
            fp = self._fingerprint_row(s, name)
            fp.state, fp.updated_at, fp.error = TaskState.done, time.time(), None
            self._write_files(s, self._case_id(s, name), files)

    def fingerprint_done(self, name: str, run_id: int, key: str, input_digest: str, files: Sequence[InputFileInfo],
                         result_file: str, result_size: int, result_sha256: str, shape_after_crop: list[Any],
                         spacing: list[Any], duration_s: float, peak_rss: int | None,
                         header: dict[str, Any] | None, findings: Iterable[FindingRecord] = ()) -> None:
        """A case's fingerprint result is committed; its findings (warnings) replace those of its last result."""
        with self._write() as s, s.no_autoflush:
            # no flush before each statement: nothing pending in a group touches this case's rows but these lines
            case_id = self._case_id(s, name)
            self._replace_findings(s, case_id, run_id, findings)
            values = {"input_digest": input_digest, "updated_at": time.time(), **({"header": header} if header else {})}
            if s is self._group:
                self._case_updates.setdefault(case_id, {}).update(values)
            else:
                s.execute(update(Case).where(Case.id == case_id).values(**values))
            self._write_files(s, case_id, files)
            fp = self._fingerprint_row(s, name)
            fp.state, fp.key, fp.input_digest, fp.run_id = TaskState.done, key, input_digest, run_id
            fp.result_file, fp.result_size, fp.result_sha256 = result_file, result_size, result_sha256
            fp.shape_after_crop, fp.spacing = shape_after_crop, spacing
            fp.duration_s, fp.peak_rss = duration_s, peak_rss
            fp.error, fp.deaths, fp.updated_at = None, 0, time.time()

    def _replace_findings(self, s: Session, case_id: int | None, run_id: int | None,
                          findings: Iterable[FindingRecord]) -> None:
        findings = list(findings)
        if self._found_in is None:  # the cases that have findings, so that most cases cost no DELETE
            self._found_in = set(s.scalars(select(Finding.case_id).distinct()))
        if case_id in self._found_in or case_id is None:
            whose = Finding.case_id == case_id if case_id is not None else Finding.case_id.is_(None)
            s.execute(delete(Finding).where(whose))
        if findings:
            self._found_in.add(case_id)
        now = time.time()
        for f in findings:
            s.add(Finding(case_id=case_id, level=f.level, kind=f.kind, path=f.path, message=f.message, run_id=run_id,
                          created_at=now))

    def set_dataset_findings(self, run_id: int, findings: Iterable[FindingRecord]) -> None:
        """Dataset-level problems found by this run (they replace the last run's)."""
        with self._write() as s:
            self._replace_findings(s, None, run_id, findings)

    def findings(self) -> list[FindingRecord]:
        with self._session() as s:
            rows = s.execute(select(Case.name, Finding.level, Finding.kind, Finding.path, Finding.message)
                             .outerjoin(Case, Case.id == Finding.case_id).order_by(Finding.case_id, Finding.id))
            return [FindingRecord(*row) for row in rows]

    def case_failed_outright(self, name: str, run_id: int, error: str) -> None:
        """A case that cannot even be attempted (a label without images): recorded failed, as a case whose
        fingerprint failed, so that `status` and the summary name it."""
        with self._write() as s:
            fp = self._fingerprint_row(s, name)
            fp.state, fp.error, fp.updated_at, fp.run_id = TaskState.failed, error, time.time(), run_id

    def fingerprint_ended_badly(self, name: str, state: TaskState, error: str, died: bool,
                                peak_rss: int | None = None) -> None:
        """A fingerprint attempt failed (state failed/quarantined) or will be retried (state pending)."""
        with self._write() as s:
            fp = self._fingerprint_row(s, name)
            fp.state, fp.error, fp.updated_at = state, error, time.time()
            if died:
                fp.deaths += 1
            if peak_rss is not None:
                fp.peak_rss = peak_rss


    def _output_row(self, s: Session, name: str, data_identifier: str, configuration: str) -> Output | _GroupRow:
        case_id = self._case_id(s, name)
        if s is self._group:
            self._load_rows(s, "o")
            row = self._rows.get(("o", case_id, data_identifier))
            if row is None:  # rows are made by ensure_outputs before a stage; this is the rare way round
                values = {"case_id": case_id, "data_identifier": data_identifier, "configuration": configuration,
                          "state": TaskState.pending, "attempts": 0, "deaths": 0, "updated_at": time.time()}
                pk = cast(Any, s.execute(insert(Output).values(**values))).inserted_primary_key[0]
                row = self._rows["o", case_id, data_identifier] = _GroupRow(Output, pk, 0, 0)
            self._touched[id(row)] = row
            self._touched_cases.add(case_id)
            return row
        o = s.scalar(select(Output).where(Output.case_id == case_id, Output.data_identifier == data_identifier))
        if o is None:
            o = Output(case_id=case_id, data_identifier=data_identifier, configuration=configuration,
                       state=TaskState.pending, attempts=0, deaths=0, updated_at=time.time())
            s.add(o)
        return o

    def ensure_outputs(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Creates pending rows for (case, data_identifier, configuration) that have none, so `status` counts them."""
        with self._write() as s:
            rows = list(rows)
            self._ensure_cases(s, (name for name, _, _ in rows))
            existing = {(n, d) for n, d in s.execute(select(Case.name, Output.data_identifier).join(Output.case))}
            now, new = time.time(), []
            for name, data_identifier, configuration in rows:
                if (name, data_identifier) not in existing:
                    existing.add((name, data_identifier))
                    new.append({"case_id": self._case_ids[name], "data_identifier": data_identifier,
                                "configuration": configuration, "state": TaskState.pending, "attempts": 0,
                                "deaths": 0, "updated_at": now})
            if new:
                s.execute(insert(Output), new)

    def outputs_started(self, name: str, targets: list[tuple[str, str, str]], input_digest: str, run_id: int,
                        estimate: int | None) -> None:
        """Marks (data_identifier, configuration, config_hash) targets running: from now on their old files are not
        vouched for. The hash and digest say what this attempt is made from (a failed or quarantined row keeps them)."""
        with self._write() as s:
            for data_identifier, configuration, config_hash in targets:
                o = self._output_row(s, name, data_identifier, configuration)
                o.state, o.configuration, o.estimate_bytes = TaskState.running, configuration, estimate
                o.config_hash, o.input_digest = config_hash, input_digest
                o.attempts += 1
                o.updated_at = time.time()

    def output_done(self, name: str, data_identifier: str, configuration: str, run_id: int, config_hash: str,
                    input_digest: str, files: list[dict[str, Any]], duration_s: float, peak_rss: int | None) -> None:
        """The commit point: after this, the case's files in `data_identifier` are trusted."""
        with self._write() as s:
            o = self._output_row(s, name, data_identifier, configuration)
            o.state, o.config_hash, o.input_digest, o.files = TaskState.done, config_hash, input_digest, files
            o.duration_s, o.peak_rss, o.run_id, o.error, o.deaths = duration_s, peak_rss, run_id, None, 0
            o.configuration, o.updated_at = configuration, time.time()
            if s is not self._group:
                s.flush()
            crashpoints.reached("ledger_commit")

    def outputs_ended_badly(self, name: str, data_identifiers: list[str], state: TaskState, error: str, died: bool,
                            peak_rss: int | None = None) -> None:
        with self._write() as s:
            case_id = self._case_id(s, name)
            rows: Iterable[Output | _GroupRow]
            if s is self._group:
                self._load_rows(s, "o")
                rows = [self._output_row(s, name, ident, "") for ident in data_identifiers
                        if ("o", case_id, ident) in self._rows]
            else:
                rows = s.scalars(select(Output).where(Output.case_id == case_id,
                                                      Output.data_identifier.in_(data_identifiers)))
            for o in rows:
                o.state, o.error, o.updated_at = state, error, time.time()
                if died:
                    o.deaths += 1
                if peak_rss is not None:
                    o.peak_rss = peak_rss

    def invalidate_outputs(self, keys: Iterable[tuple[str, str]], reason: str) -> None:
        """Marks (case, data_identifier) rows pending: their files are no longer vouched for."""
        with self._write() as s:
            for name, data_identifier in keys:
                case_id = self._case_id(s, name)
                s.execute(update(Output).where(Output.case_id == case_id, Output.data_identifier == data_identifier)
                          .values(state=TaskState.pending, error=reason, updated_at=time.time()))


    def reset_running(self) -> int:
        """Rows left `running` by a run that died go back to pending. Returns how many."""
        with self._write() as s:
            n = 0
            for table in (Output, Fingerprint):
                result: Any = s.execute(update(table).where(table.state == TaskState.running)
                                        .values(state=TaskState.pending, error="interrupted while running"))
                n += result.rowcount
            return n

    # ---- configurations and artifacts -------------------------------------------------------------------------

    def set_configurations(self, configurations: list[ConfigurationRecord]) -> None:
        with self._write() as s:
            s.execute(delete(Configuration))
            for c in configurations:
                s.add(Configuration(data_identifier=c.data_identifier, configuration=c.configuration,
                                    plans_identifier=c.plans_identifier, config_hash=c.config_hash,
                                    updated_at=time.time()))

    def rekey_outputs(self, configurations: Iterable[ConfigurationRecord]) -> int:
        """Outputs keyed on a configuration's earlier hash are keyed on its current one (both describe the same
        outputs under the current plans). Returns how many rows changed."""
        n = 0
        with self._write() as s:
            for c in configurations:
                if c.earlier_hash is not None and c.earlier_hash != c.config_hash:
                    result: Any = s.execute(update(Output).where(Output.data_identifier == c.data_identifier,
                                                                 Output.config_hash == c.earlier_hash)
                                            .values(config_hash=c.config_hash))
                    n += result.rowcount
        return n

    def configurations(self) -> list[ConfigurationRecord]:
        with self._session() as s:
            return [ConfigurationRecord(c.data_identifier, c.configuration, c.plans_identifier, c.config_hash)
                    for c in s.scalars(select(Configuration).order_by(Configuration.data_identifier))]

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        with self._session() as s:
            a = s.get(Artifact, name)
            return ArtifactRecord(a.name, a.key, a.size, a.sha256, a.details, a.updated_at) if a else None

    def artifacts(self) -> list[ArtifactRecord]:
        with self._session() as s:
            return [ArtifactRecord(a.name, a.key, a.size, a.sha256, a.details, a.updated_at)
                    for a in s.scalars(select(Artifact).order_by(Artifact.name))]

    def set_artifact(self, name: str, key: str, size: int, sha256: str, run_id: int,
                     details: dict[str, Any] | None = None) -> None:
        with self._write() as s:
            a = s.get(Artifact, name)
            if a is None:
                a = Artifact(name=name)
                s.add(a)
            a.key, a.size, a.sha256, a.run_id, a.details, a.updated_at = key, size, sha256, run_id, details, time.time()


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

    # ---- prediction -------------------------------------------------------------------------------------------

    def set_case_inputs(self, inputs: dict[str, tuple[str, list[InputFileInfo]]]) -> None:
        """Each case's input digest and files as hashed now (prediction has no fingerprint stage to record them);
        only cases whose digest or file stats changed are written."""
        with self._write() as s:
            self._ensure_cases(s, inputs)
            known: dict[int, tuple[Optional[str], list[tuple[Any, ...]]]] = {}
            for case_id, digest in s.execute(select(Case.id, Case.input_digest)):
                known[case_id] = (digest, [])
            for case_id, role, channel, path, size, mtime, digest in s.execute(
                    select(InputFile.case_id, InputFile.role, InputFile.channel, InputFile.path, InputFile.size,
                           InputFile.mtime_ns, InputFile.digest).order_by(InputFile.id)):
                known[case_id][1].append((role, channel, path, size, mtime, digest))
            now = time.time()
            for name, (digest, files) in inputs.items():
                case_id = self._case_ids[name]
                rows = [(f.role, f.channel, f.path, f.size, f.mtime_ns, f.digest) for f in files]
                if known.get(case_id) == (digest, rows):
                    continue
                s.execute(update(Case).where(Case.id == case_id).values(input_digest=digest, updated_at=now))
                s.execute(delete(InputFile).where(InputFile.case_id == case_id))
                if rows:
                    s.execute(insert(InputFile), [{"case_id": case_id, "role": f.role, "channel": f.channel,
                                                   "path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
                                                   "digest": f.digest} for f in files])
