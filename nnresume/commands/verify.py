"""`nnresume verify`: re-check finished outputs against the ledger, and withdraw the ledger's word for any that fail.

By default sizes only (a stat per file); with `full`, also each file's SHA-256, and that blosc2 arrays decompress and
property pickles load. A deleted, truncated or corrupted output is reported by case, configuration and file, and its
ledger row goes back to pending, so the next `nnresume preprocess` redoes it (a same-size bit flip would otherwise
pass its size check). Files in a data folder that no ledger row vouches for are listed too; `preprocess` removes them.
"""
from __future__ import annotations

import json
import pickle
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..dataset import DatasetLayout
from ..io import atomic
from ..ledger.models import TaskState
from ..ledger.repository import Ledger
from ..preprocess.outputs import unvouched_files


@dataclass
class Problem:
    case: str
    where: str  # data identifier, or "fingerprint"
    file: str
    problem: str


@dataclass
class VerifyReport:
    dataset: str
    checked_files: int = 0
    full: bool = False
    problems: list[Problem] = field(default_factory=list)
    unvouched: list[str] = field(default_factory=list)
    command: str = "preprocess"  # the command whose next run redoes what failed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_file(path: Path, size: Optional[int], sha256: Optional[str], full: bool) -> Optional[str]:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "deleted"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if size is not None and actual != size:
        return f"size {actual} instead of {size} (truncated or replaced)"
    if not full:
        return None
    if sha256 and atomic.file_digest(path) != sha256:
        return "checksum differs from the one recorded when it was written (corrupted or replaced)"
    try:
        if path.name.endswith(".b2nd"):
            import blosc2

            blosc2.open(str(path), mode="r")[:]
        elif path.name.endswith(".pkl"):
            with open(path, "rb") as f:
                pickle.load(f)
    except Exception as e:  # any failure to decode is the finding itself
        return f"cannot be decoded: {type(e).__name__}: {e}"
    return None


def _file_ending(layout: DatasetLayout) -> str:
    """The labels' ending, from the dataset.json the planner copied beside the plans; without it, any file in
    gt_segmentations counts."""
    try:
        return str(json.loads((layout.preprocessed / "dataset.json").read_text())["file_ending"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def verify(layout: DatasetLayout, ledger: Ledger, full: bool, progress: bool = True,
           prediction: bool = False) -> VerifyReport:
    """A dataset's outputs, or with `prediction` a prediction folder's (its files lie in the folder itself, beside
    files nnresume did not write: those are not listed as unvouched)."""
    report = VerifyReport(layout.name, full=full, command="predict" if prediction else "preprocess")
    records = ledger.load_cases()
    bad_outputs: dict[tuple[str, str], str] = {}
    bad_fingerprints: dict[str, str] = {}
    for rec in tqdm(records.values(), desc="Verify", unit="case", disable=not (progress and sys.stderr.isatty())):
        for ident, out in rec.outputs.items():
            if out.state != TaskState.done:
                continue
            folder = layout.preprocessed if prediction else layout.data_folder(ident)
            for f in out.files or []:
                report.checked_files += 1
                problem = _check_file(folder / f["name"], f.get("size"), f.get("sha256"), full)
                if problem:
                    report.problems.append(Problem(rec.name, ident, str(folder / f["name"]), problem))
                    bad_outputs.setdefault((rec.name, ident), f"verify: {f['name']} {problem}")
        fp = rec.fingerprint
        if fp is not None and fp.state == TaskState.done and fp.result_file:
            report.checked_files += 1
            path = layout.work / fp.result_file
            problem = _check_file(path, fp.result_size, fp.result_sha256, full)
            if problem:
                report.problems.append(Problem(rec.name, "fingerprint", str(path), problem))
                bad_fingerprints[rec.name] = f"verify: fingerprint result {problem}"

    idents = {ident for rec in records.values() for ident in rec.outputs}
    if not prediction:
        report.unvouched = [str(p) for p in unvouched_files(layout, records, idents, _file_ending(layout))]

    for key, reason in bad_outputs.items():
        ledger.invalidate_outputs([key], reason)
    for name, reason in bad_fingerprints.items():
        ledger.fingerprint_ended_badly(name, TaskState.pending, reason, died=False)
    return report


def render(report: VerifyReport) -> str:
    lines = [f"{report.dataset}: checked {report.checked_files} file(s) "
             f"({'sizes, checksums and decoding' if report.full else 'sizes; --full also checks checksums'})"]
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s); the next `nnresume {report.command}` redoes these:")
        for p in report.problems:
            lines.append(f"  case {p.case} [{p.where}] {p.file}: {p.problem}")
    else:
        lines.append("every finished output matches the ledger")
    if report.unvouched:
        lines.append(f"{len(report.unvouched)} file(s) in data folders that no ledger entry vouches for "
                     f"(the next `nnresume preprocess` removes them):")
        lines += [f"  {p}" for p in report.unvouched[:20]]
        if len(report.unvouched) > 20:
            lines.append(f"  ... and {len(report.unvouched) - 20} more")
    return "\n".join(lines)
