"""`nnresume check`: validate datasets without preprocessing them, reporting every problem rather than the first.

Default: fast checks from files and headers (missing, empty or extra files, channel files against dataset.json,
unreadable headers, truncated `.nii.gz`, image channels and label disagreeing on shape or spacing). With `full`:
also every pixel through nnU-Net's reader (NaN/inf, undeclared label values, labels with only background) and every
gzip stream's CRC. With several datasets: whether they agree on channel names and count, as multi-task and continual
training need. On a preprocessed dataset: whether the plans' normalisation schemes match the channel count, and
whether every output the ledger vouches for is present.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from . import validate
from .dataset import CaseFiles, DatasetLayout, list_cases, load_dataset_json, read_header
from .errors import CaseError, NnresumeError


@dataclass
class Finding:
    level: str  # "error" or "warning"
    message: str
    case: Optional[str] = None


@dataclass
class DatasetCheck:
    dataset: str
    cases: int = 0
    channels: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)


def _collect(findings: list[Finding], case: Optional[str], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CaseError as e:
        findings.append(Finding("error", e.one_line(), case))
    except NnresumeError as e:
        findings.append(Finding("error", e.one_line(), case))
    return None


def _header_checks(case: str, files: CaseFiles, dataset_json: dict[str, Any]) -> list[Finding]:
    """Every problem visible from files and headers; one bad file does not hide another's."""
    out: list[Finding] = []
    _collect(out, case, lambda: validate.check_channel_files(case, files.images, dataset_json))
    usable = []
    for path in [*files.images, files.label]:
        n = len(out)
        _collect(out, case, lambda p=path: validate.before_read(case, [p], None))
        if len(out) == n:
            usable.append(path)
    headers = {}
    for p in usable:
        h = read_header(p)
        if h is None:
            out.append(Finding("error", f"case {case} ({p}): cannot read the image header", case))
        else:
            headers[p] = h
    images = [p for p in files.images if p in headers]
    if not images:
        return out
    first = headers[images[0]]
    for p in images[1:]:
        if headers[p]["shape"] != first["shape"] or not np.allclose(headers[p]["spacing"], first["spacing"]):
            out.append(Finding("error", f"case {case} ({p}): channel shape/spacing {headers[p]['shape']}/"
                                        f"{headers[p]['spacing']} differs from channel 0 "
                                        f"{first['shape']}/{first['spacing']}", case))
    lab = headers.get(files.label)
    if lab is None:
        return out
    if lab["shape"] != first["shape"]:
        out.append(Finding("error", f"case {case} ({files.label}): label shape {tuple(lab['shape'])} differs from "
                                    f"image shape {tuple(first['shape'])}", case))
    if not np.allclose(lab["spacing"], first["spacing"]):
        out.append(Finding("error", f"case {case} ({files.label}): label spacing "
                                    f"{tuple(round(s, 6) for s in lab['spacing'])} differs from image spacing "
                                    f"{tuple(round(s, 6) for s in first['spacing'])}", case))
    return out


def _pixel_checks(case: str, files: CaseFiles, dataset_json: dict[str, Any], reader: str) -> list[Finding]:
    from . import nnunet

    out: list[Finding] = []
    cls = validate.validating_reader(nnunet.reader_writer(reader), case, files.images, files.label, dataset_json)

    def read() -> None:
        rw = cls()
        rw.read_images(list(files.images))
        seg, _ = rw.read_seg(files.label)
        if seg.size and not np.any(seg > 0):
            out.append(Finding("warning", f"case {case} ({files.label}): label has only background (nnU-Net "
                                          "accepts this; make sure it is intended)", case))

    _collect(out, case, lambda: validate.wrap_nnunet_errors(case, "read", list(files.images), files.label, read))
    return out


def check_dataset(layout: DatasetLayout, full: bool, workers: int, progress: bool = True) -> DatasetCheck:
    result = DatasetCheck(layout.name)
    try:
        dataset_json = load_dataset_json(layout.raw)
        cases = list_cases(layout.raw, dataset_json)
    except NnresumeError as e:
        result.findings.append(Finding("error", e.one_line()))
        return result
    result.cases = len(cases)
    result.channels = {str(k): str(v) for k, v in dataset_json.get("channel_names",
                                                                    dataset_json.get("modality", {})).items()}
    if not cases:
        result.findings.append(Finding("error", f"no training cases in {layout.raw / 'imagesTr'}"))
        return result
    if "numTraining" in dataset_json and dataset_json["numTraining"] != len(cases):
        result.findings.append(Finding("warning", f"dataset.json says numTraining={dataset_json['numTraining']} "
                                                  f"but {len(cases)} cases were found"))
    labels_dir = layout.raw / "labelsTr"
    if labels_dir.is_dir():
        ending = dataset_json["file_ending"]
        orphans = sorted(p.name for p in labels_dir.iterdir()
                         if p.name.endswith(ending) and p.name[:-len(ending)] not in cases)
        for name in orphans:
            result.findings.append(Finding("warning", f"{labels_dir / name} has no images in imagesTr"))

    reader = None
    if full:
        from . import nnunet

        examples = [c.images[0] for c in cases.values() if c.images][:20]
        reader = _collect(result.findings, None, lambda: nnunet.reader_writer_name(dataset_json, examples))

    def one(item: tuple[str, CaseFiles]) -> list[Finding]:
        case, files = item
        found = _header_checks(case, files, dataset_json)
        if full:
            header_errors = len(found)
            for path in [*files.images, files.label]:  # every gzip stream's CRC, even where the header failed
                if os.path.isfile(path) and os.path.getsize(path) > 0:
                    _collect(found, case, lambda p=path: validate.check_compressed(case, p, full=True))
            if reader and not found:
                found += _pixel_checks(case, files, dataset_json, reader)
            seen = {f.message for f in found[:header_errors]}
            found = found[:header_errors] + [f for f in found[header_errors:] if f.message not in seen]
        return found

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for found in tqdm(ex.map(one, cases.items()), total=len(cases), desc=f"Check {layout.name}", unit="case",
                          disable=not progress):
            result.findings += found
    _check_preprocessed(layout, result)
    return result


def _check_preprocessed(layout: DatasetLayout, result: DatasetCheck) -> None:
    if not layout.preprocessed.is_dir():
        return
    n = len(result.channels)
    for path in sorted(layout.preprocessed.glob("*.json")):
        try:
            plans = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            result.findings.append(Finding("error", f"{path}: not valid JSON ({e})"))
            continue
        if not isinstance(plans, dict) or "configurations" not in plans:
            continue
        from .dataset import resolve_configuration

        for name in plans["configurations"]:
            try:
                conf = resolve_configuration(plans, name)
            except (KeyError, NnresumeError) as e:
                result.findings.append(Finding("error", f"{path.name}: configuration {name} cannot be resolved: {e}"))
                continue
            for key in ("normalization_schemes", "use_mask_for_norm"):
                if key in conf and len(conf[key]) != n:
                    result.findings.append(Finding(
                        "error", f"{path.name}: configuration {name} has {len(conf[key])} {key} for {n} channel(s) "
                                 f"in dataset.json; nnU-Net would fail with an IndexError in normalisation",
                    ))
    if layout.ledger.is_file():
        from .ledger.models import TaskState
        from .ledger.repository import Ledger

        ledger = Ledger.open(str(layout.ledger), create=False)
        try:
            for rec in ledger.load_cases().values():
                for ident, out in rec.outputs.items():
                    if out.state != TaskState.done:
                        continue
                    for f in out.files or []:
                        p = layout.data_folder(ident) / f["name"]
                        if not p.is_file() or p.stat().st_size != f["size"]:
                            result.findings.append(Finding("error", f"case {rec.name} [{ident}]: {p} is missing or "
                                                                    "its size changed; `nnresume preprocess` redoes it",
                                                           rec.name))
        finally:
            ledger.close()


def agreement(results: list[DatasetCheck]) -> list[Finding]:
    """Multi-task and continual training need the same channels, in the same order, in every dataset."""
    usable = [r for r in results if r.channels]
    if len(usable) < 2:
        return []
    first = usable[0]
    out = []
    for r in usable[1:]:
        a, b = list(first.channels.values()), list(r.channels.values())
        if a != b:
            out.append(Finding("error", f"{first.dataset} has channels {a} but {r.dataset} has {b}: they disagree in "
                                        f"{'count' if len(a) != len(b) else 'names or order'}"))
    if not out:
        out.append(Finding("info", f"all {len(usable)} datasets have the channels {list(first.channels.values())}"))
    return out


def as_dict(results: list[DatasetCheck], across: list[Finding]) -> dict[str, Any]:
    return {"datasets": [asdict(r) | {"errors": r.errors} for r in results],
            "across_datasets": [asdict(f) for f in across]}


def render(results: list[DatasetCheck], across: list[Finding]) -> str:
    lines = []
    for r in results:
        warnings = len(r.findings) - r.errors
        lines.append(f"{r.dataset}: {r.cases} case(s), channels {list(r.channels.values())}: "
                     f"{r.errors} error(s), {warnings} warning(s)")
        for f in r.findings:
            lines.append(f"  {f.level}: {f.message}")
    for f in across:
        lines.append(f"{f.level}: {f.message}")
    return "\n".join(lines)
