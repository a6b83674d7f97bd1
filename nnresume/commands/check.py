"""`nnresume check`: validate datasets without preprocessing them, reporting every problem rather than the first.

Default: fast checks from files and headers, counted as nnU-Net's reader will count them (missing, empty or
unreadable files, channels against dataset.json, truncated `.nii.gz`, image channels and label disagreeing on shape
or spacing), labels without images, numTraining. With `full`: also every gzip stream's CRC, and every case read
through nnU-Net's reader in a worker process, as the fingerprint stage reads it (what fails a case there is an
error here; NaN read as 0, labels not aligned, with only background or with several values per pixel are
warnings). With several datasets:
whether they agree on channel names and count, as multi-task and continual training need. On a preprocessed
dataset: whether the plans' normalisation schemes match the channel count, and whether every output the ledger
vouches for is present.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from ..config import Paths
from ..dataset import CaseFiles, DatasetLayout, list_cases, load_dataset_json, orphan_labels
from ..errors import CaseError, NnresumeError
from ..execution import system
from ..execution.memory import Estimator, default_budget, fingerprint_units
from ..execution.pools.base import Pool
from ..execution.runner import Runner, StopFlag
from ..execution.scheduler import QueueItem, Scheduler
from ..geometry import geometry, likely_reader, read_header
from ..io import atomic
from ..ledger.models import TaskState
from ..progress import StageProgress
from ..tasks import InspectResult, InspectTask, ReaderTask
from ..worker import validate


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
    """Every problem visible from files and headers; one bad file does not hide another's.

    Channels, shapes and spacings are compared as nnU-Net's reader will return them (geometry.py): one RGB file is
    three channels, a 2D image is (1, h, w).
    """
    out: list[Finding] = []
    usable = []
    for path in [*files.images, files.label]:
        n = len(out)
        _collect(out, case, partial(validate.before_read, case, [path], None))
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
    reader = likely_reader(dataset_json["file_ending"], headers[images[0]],
                           dataset_json.get("overwrite_image_reader_writer"))
    geos = {p: geometry(headers[p], reader, p, "label" if p == files.label else "image") for p in headers}
    if len(images) == len(files.images) and all(geos[p] is not None for p in images):
        per_file = [geos[p].channels for p in images]  # type: ignore[union-attr]
        _collect(out, case, lambda: validate.check_channel_count(case, list(files.images), sum(per_file),
                                                                 dataset_json, per_file))
    first = geos[images[0]]
    if first is None:
        return out
    for p in images[1:]:
        g = geos[p]
        if g is not None and (g.shape != first.shape or not np.allclose(g.spacing, first.spacing)):
            out.append(Finding("error", f"case {case} ({p}): channel shape/spacing {list(g.shape)}/"
                                        f"{list(g.spacing)} differs from the first channel's "
                                        f"{list(first.shape)}/{list(first.spacing)}", case))
    lab = geos.get(files.label)
    if lab is None:
        return out
    if lab.shape != first.shape:
        out.append(Finding("error", f"case {case} ({files.label}): label shape {lab.shape} differs from "
                                    f"image shape {first.shape}", case))
    if not np.allclose(lab.spacing, first.spacing):
        out.append(Finding("error", f"case {case} ({files.label}): label spacing "
                                    f"{tuple(round(s, 6) for s in lab.spacing)} differs from image spacing "
                                    f"{tuple(round(s, 6) for s in first.spacing)}", case))
    if lab.channels > 1:
        out.append(Finding("warning", validate.label_channels(case, files.label, lab.channels), case))
    if "dataset" not in dataset_json:
        numbering = validate.channel_numbering(list(files.images), dataset_json["file_ending"])
        if numbering:
            out.append(Finding("warning", f"case {case} ({os.path.dirname(files.images[0])}): {numbering}", case))
    return out


@dataclass
class _Inspect:
    task_id: str
    case: str
    files: CaseFiles


class _InspectHandler:
    """The runner's stage handler for `check --full`: one InspectTask per case, findings collected, no ledger."""

    stage = "inspect"

    def __init__(self, dataset_json: dict[str, Any], reader: str) -> None:
        self.dataset_json, self.reader = dataset_json, reader
        self.findings: dict[str, list[Finding]] = {}

    def build(self, item: QueueItem, attempt: int) -> InspectTask:
        w: _Inspect = item.spec
        return InspectTask(w.task_id, w.case, w.files.images, w.files.label, self.dataset_json, self.reader)

    def started(self, item: QueueItem) -> None:
        pass

    def received(self, item: QueueItem, message: Any) -> None:
        if isinstance(message, InspectResult):
            self.findings[item.case] = [Finding("warning", w.message, item.case) for w in message.warnings]

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None:
        if state != TaskState.pending:  # failed, or quarantined after worker deaths; pending means it is retried
            self.findings[item.case] = [Finding("error", message, item.case)]

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        return item.units


def inspect_in_workers(cases: dict[str, CaseFiles], dataset_json: dict[str, Any], pool: Pool, workers: int,
                       progress: bool) -> tuple[list[Finding], dict[str, list[Finding]]]:
    """Reads each case through nnU-Net's reader in a worker, as the fingerprint stage would (memory-governed; a
    reader that crashes takes only its worker). Returns dataset-level findings and each case's."""
    budget = default_budget(system.available_memory(), system.cgroup_is_tighter())
    runner = Runner(pool, budget, workers, Estimator(), 0, lambda a: None, lambda s: None, StopFlag(), 0.0,
                    progress=None)
    examples = tuple(c.images[0] for c in cases.values() if c.images)[:20]
    try:
        reader = str(runner.run_one(ReaderTask("check-reader", dataset_json, examples)).value)
    except NnresumeError as e:
        return [Finding("error", e.one_line())], {}
    handler = _InspectHandler(dataset_json, reader)
    scheduler = Scheduler(workers)
    for name, files in cases.items():
        units = {"fingerprint": fingerprint_units(read_header(files.images[0]) if files.images else None,
                                                  list(files.images))}
        scheduler.add(_Inspect(f"inspect-{name}", name, files), runner.estimator.estimate(units), units)
    bar = StageProgress("Read every case", len(scheduler), 0, progress and sys.stderr.isatty())
    runner.progress = bar
    try:
        runner.run(scheduler, handler)
    finally:
        bar.close()
    return [], handler.findings


def check_dataset(layout: DatasetLayout, full: bool, workers: int, progress: bool = True,
                  pool: Optional[Pool] = None) -> DatasetCheck:
    """Every problem of one dataset. `full` reads every case in a worker of `pool` (which the caller owns)."""
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
    result.findings += _dataset_findings(layout, dataset_json, cases)

    def one(item: tuple[str, CaseFiles]) -> list[Finding]:
        case, files = item
        found = _header_checks(case, files, dataset_json)
        if full:
            for path in [*files.images, files.label]:  # every gzip stream's CRC, even where the header failed
                if os.path.isfile(path) and os.path.getsize(path) > 0:
                    _collect(found, case, partial(validate.check_compressed, case, path, full=True))
        return found

    per_case: dict[str, list[Finding]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        bar = tqdm(ex.map(one, cases.items()), total=len(cases), unit="case", desc=f"Check {layout.name}",
                   disable=not (progress and sys.stderr.isatty()))
        for case, found in zip(cases, bar):
            per_case[case] = found
    # a header error says enough about a case; one with warnings only is read like the others
    clean = {n: f for n, f in cases.items() if not any(x.level == "error" for x in per_case[n])} if full else {}
    if pool is not None and clean:
        dataset_level, pixels = inspect_in_workers(clean, dataset_json, pool, workers, progress)
        result.findings += dataset_level
        for case, found in pixels.items():
            seen = {f.message for f in per_case[case]}
            per_case[case] += [f for f in found if f.message not in seen]
    for case in cases:
        result.findings += per_case[case]
    _check_preprocessed(layout, result)
    return result


def check_datasets(layouts: list[DatasetLayout], paths: Paths, full: bool, workers: int, progress: bool
                   ) -> list[DatasetCheck]:
    """Every problem of each dataset. With `full`, cases are read in the workers of one local pool, started and
    stopped here: this process never imports nnunetv2."""
    pool = None
    if full:
        from ..execution.pools.local import LocalPool

        os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = paths.raw, paths.preprocessed
        pool = LocalPool()
        pool.warm_up()
    try:
        return [check_dataset(layout, full, workers, progress, pool) for layout in layouts]
    finally:
        if pool is not None:
            pool.shutdown()


def _dataset_findings(layout: DatasetLayout, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]
                      ) -> list[Finding]:
    out = []
    if "numTraining" in dataset_json and dataset_json["numTraining"] != len(cases):
        out.append(Finding("error", f"dataset.json says numTraining={dataset_json['numTraining']} but {len(cases)} "
                                    "training case(s) were found; correct numTraining (nnU-Net's integrity check "
                                    "rejects this)"))
    ending = dataset_json["file_ending"]
    for name, path in orphan_labels(layout.raw, dataset_json, cases).items():
        out.append(Finding("error", f"case {name} ({path}): label has no image files in imagesTr (expected "
                                    f"{name}_0000{ending}); add the images or remove the label", name))
    return out


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
        from ..dataset import resolve_configuration

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
    _check_fingerprint_file(layout, result)
    if layout.ledger.is_file():
        from ..ledger.models import TaskState
        from ..ledger.repository import Ledger

        ledger = Ledger.open(str(layout.ledger), create=False)
        try:
            art = ledger.get_artifact("dataset_fingerprint.json")
            if (art is not None and layout.fingerprint_json.is_file()
                    and atomic.file_digest(layout.fingerprint_json) != art.sha256):
                result.findings.append(Finding("warning", f"{layout.fingerprint_json} is not the fingerprint nnresume "
                                                          "computed (changed or written by another tool); `nnresume "
                                                          "preprocess` writes it again"))
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


def _check_fingerprint_file(layout: DatasetLayout, result: DatasetCheck) -> None:
    """dataset_fingerprint.json lists one shape per case: one that describes another number of cases is stale.
    nnUNetv2_plan_and_preprocess and nnUNetv2_extract_fingerprint without --clean reuse it as it is, so plans made
    from it describe the dataset as it was (nnresume's own is written again whenever a case changes)."""
    try:
        shapes = json.loads(layout.fingerprint_json.read_text()).get("shapes_after_crop")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(shapes, list) and len(shapes) != result.cases:
        result.findings.append(Finding(
            "warning", f"{layout.fingerprint_json} describes {len(shapes)} case(s) but the dataset has "
                       f"{result.cases}: nnU-Net's planning would reuse it as it is unless run with --clean; "
                       "`nnresume preprocess` (or `nnresume extract-fingerprint`) computes it for the cases there are"))


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
