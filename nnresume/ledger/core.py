"""The ledger's machinery that every operation shares: sessions, one transaction per operation or a group of
operations committed together, and a case's fingerprint and output rows, found alike in and out of a group.

Only the orchestrator process writes the ledger. While a stage runs, writes are grouped (`start_group` to
`end_group`): tasks that finish close together cost one commit, and one fsync of the ledger, instead of one each. The
rows a group touches are plain `GroupRow` objects, written with one executemany per table by `commit_group`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, TypeVar, cast

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from ..tasks import InputFileInfo
from . import engine as engine_mod
from .models import Case, Fingerprint, InputFile, Output, TaskState

L = TypeVar("L", bound="LedgerCore")


class GroupRow:
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


class LedgerCore:
    """The engine, the group in progress and the rows it holds: what the operations (history.py, state.py,
    queries.py) share."""

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
        self._rows: dict[tuple[str, int, str], GroupRow] = {}
        self._loaded: set[str] = set()
        self._touched: dict[int, GroupRow] = {}
        self._touched_cases: set[int] = set()
        # While grouping, case-level writes wait for the commit and go in one statement each: the latest values per
        # case (input digest, header) and the latest input-file list per case.
        self._case_updates: dict[int, dict[str, Any]] = {}
        self._file_writes: dict[int, list[InputFileInfo]] = {}
        self._found_in: Optional[set[int | None]] = None

    # ---- writing: one transaction per operation, or a group of operations committed together -------------------------

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
    def open(cls: type[L], path: str, create: bool = True) -> L:
        return cls(engine_mod.open_engine(path, create=create))

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- rows: a case, its input files, its fingerprint and output rows, in or out of a group ------------------------

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

    def _write_files(self, s: Session, case_id: int, files: Sequence[InputFileInfo]) -> None:
        if s is self._group:
            self._file_writes[case_id] = list(files)
            return
        s.execute(delete(InputFile).where(InputFile.case_id == case_id))
        for f in files:
            s.add(InputFile(case_id=case_id, role=f.role, channel=f.channel, path=f.path, size=f.size,
                            mtime_ns=f.mtime_ns, digest=f.digest))

    def _load_rows(self, s: Session, kind: str) -> None:
        """Loads the keys and counters of every fingerprint ("f") or output ("o") row, once per group."""
        if kind in self._loaded:
            return
        with s.no_autoflush:
            if kind == "f":
                for case_id, attempts, deaths in s.execute(select(Fingerprint.case_id, Fingerprint.attempts,
                                                                  Fingerprint.deaths)):
                    self._rows["f", case_id, ""] = GroupRow(Fingerprint, case_id, attempts, deaths)
            else:
                for pk, case_id, ident, attempts, deaths in s.execute(select(
                        Output.id, Output.case_id, Output.data_identifier, Output.attempts, Output.deaths)):
                    self._rows["o", case_id, ident] = GroupRow(Output, pk, attempts, deaths)
        self._loaded.add(kind)

    def _fingerprint_row(self, s: Session, name: str) -> Fingerprint | GroupRow:
        case_id = self._case_id(s, name)
        if s is self._group:
            self._load_rows(s, "f")
            row = self._rows.get(("f", case_id, ""))
            if row is None:
                row = self._rows["f", case_id, ""] = GroupRow(Fingerprint, case_id, 0, 0, {
                    "state": TaskState.pending, "attempts": 0, "deaths": 0, "updated_at": time.time()})
            self._touched[id(row)] = row
            self._touched_cases.add(case_id)
            return row
        fp = s.get(Fingerprint, case_id)
        if fp is None:
            fp = Fingerprint(case_id=case_id, state=TaskState.pending, attempts=0, deaths=0, updated_at=time.time())
            s.add(fp)
        return fp

    def _output_row(self, s: Session, name: str, data_identifier: str, configuration: str) -> Output | GroupRow:
        case_id = self._case_id(s, name)
        if s is self._group:
            self._load_rows(s, "o")
            row = self._rows.get(("o", case_id, data_identifier))
            if row is None:  # rows are made by ensure_outputs before a stage; this is the rare way round
                values = {"case_id": case_id, "data_identifier": data_identifier, "configuration": configuration,
                          "state": TaskState.pending, "attempts": 0, "deaths": 0, "updated_at": time.time()}
                pk = cast(Any, s.execute(insert(Output).values(**values))).inserted_primary_key[0]
                row = self._rows["o", case_id, data_identifier] = GroupRow(Output, pk, 0, 0)
            self._touched[id(row)] = row
            self._touched_cases.add(case_id)
            return row
        o = s.scalar(select(Output).where(Output.case_id == case_id, Output.data_identifier == data_identifier))
        if o is None:
            o = Output(case_id=case_id, data_identifier=data_identifier, configuration=configuration,
                       state=TaskState.pending, attempts=0, deaths=0, updated_at=time.time())
            s.add(o)
        return o
