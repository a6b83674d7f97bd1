"""Where each case stands: its record and input files, its fingerprint and findings, its outputs, and the
configurations and artifacts the outputs are keyed on.

The operation that makes an output real is `output_done`: its commit is the moment a case's files in a configuration
folder become trusted.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional, cast

from sqlalchemy import Text, delete, insert, select, type_coerce, update
from sqlalchemy.orm import Session

from ..io import crashpoints
from ..tasks import InputFileInfo
from .core import GroupRow, LedgerCore
from .models import Artifact, Case, Configuration, Finding, Fingerprint, InputFile, Output, TaskState
from .records import ArtifactRecord, CaseRecord, ConfigurationRecord, FindingRecord, FingerprintRecord, OutputRecord


def _text(column: Any) -> Any:
    """A JSON column as the text SQLite holds, for `_json_each`."""
    return type_coerce(column, Text)


def _json_each(texts: Iterable[Optional[str]]) -> list[Any]:
    """The values of JSON texts (NULL as None), decoded by one json.loads: at 25,000 cases a rerun reads 125,000
    of them, and a call each cost 1.5 s."""
    return json.loads("[" + ",".join("null" if t is None else t for t in texts) + "]")


class CaseState(LedgerCore):
    """Cases, their input files, fingerprints, findings and outputs; configurations and artifacts."""

    # ---- cases -------------------------------------------------------------------------------------------------------

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

    def remove_cases(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        with self._write() as s:
            s.execute(delete(Case).where(Case.name.in_(names)))
        for n in names:
            self._case_ids.pop(n, None)

    def set_case_headers(self, headers: dict[str, dict[str, Any] | None]) -> None:
        with self._write() as s:
            self._ensure_cases(s, headers)
            s.execute(update(Case), [{"id": self._case_ids[n], "header": h} for n, h in headers.items()])

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

    # ---- fingerprint stage -------------------------------------------------------------------------------------------

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

    # ---- outputs -----------------------------------------------------------------------------------------------------

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
            rows: Iterable[Output | GroupRow]
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

    # ---- configurations and artifacts --------------------------------------------------------------------------------

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
                for earlier in c.earlier_hashes:
                    if earlier == c.config_hash:
                        continue
                    result: Any = s.execute(update(Output).where(Output.data_identifier == c.data_identifier,
                                                                 Output.config_hash == earlier)
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
