"""Stage 3: each case through each configuration's preprocessor, and its label into gt_segmentations/.

One task per case covers every configuration that case still needs, so its raw files are read and decoded once
(nnU-Net reads them once per configuration). Each configuration's files are committed as soon as they are staged: a
case killed during its third configuration keeps the first two.

A (case, data folder) is skipped only when the ledger says done with the same input digest and configuration hash and
its files exist with the recorded sizes (checksums too with --verify-outputs). Anything else is redone, and at the
end files in a data folder that the ledger does not vouch for are removed, as nnU-Net itself empties the folder.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import close_matches
from ..dataset import (
    GT_IDENTIFIER,
    CaseFiles,
    DatasetLayout,
    config_hash,
    earlier_config_hashes,
    gt_hash,
    output_names,
    resolve_configuration,
)
from ..errors import UsageError
from ..execution.memory import preprocess_units
from ..execution.scheduler import QueueItem, Scheduler
from ..io import atomic
from ..ledger.models import TaskState
from ..ledger.repository import CaseRecord, ConfigurationRecord, OutputRecord
from ..tasks import OutputResult, PreprocessTask, Target
from .context import RunContext, place_files

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".b2nd", ".pkl", ".npz", ".npy")


@dataclass
class OutputWork:
    task_id: str
    case: str
    files: CaseFiles
    targets: list[Target]
    reasons: dict[str, str]


@dataclass
class PreprocessPlan:
    configurations: list[ConfigurationRecord]
    work: list[OutputWork] = field(default_factory=list)
    up_to_date: int = 0
    blocked: dict[str, str] = field(default_factory=dict)  # case -> why it cannot be preprocessed
    skipped_quarantined: list[tuple[str, str]] = field(default_factory=list)


def configurations_in_scope(ctx: RunContext, plans: dict[str, Any], dataset_json: dict[str, Any]
                            ) -> list[ConfigurationRecord]:
    """The requested configurations the plans contain, one per data folder, plus gt_segmentations."""
    scope: list[ConfigurationRecord] = []
    seen: dict[str, str] = {}
    for name in ctx.settings.configurations:
        if name not in plans["configurations"]:
            if ctx.settings.explicit_configurations:
                have = list(plans["configurations"])
                raise UsageError(f"-c {name}: plans {plans['plans_name']} have no configuration {name!r} (they have "
                                 f"{', '.join(have)})", close_matches(name, have))
            log.info("Configuration %s is not in plans %s; skipping it (the planner did not make it)", name,
                     plans["plans_name"])
            continue
        ident = resolve_configuration(plans, name)["data_identifier"]
        if ident in seen:
            log.info("Configuration %s uses the data of %s (%s)", name, seen[ident], ident)
            continue
        seen[ident] = name
        scope.append(ConfigurationRecord(ident, name, plans["plans_name"],
                                         config_hash(plans, name, dataset_json, ctx.nnunetv2_version),
                                         earlier_config_hashes(plans, name, dataset_json, ctx.nnunetv2_version)))
    scope.append(ConfigurationRecord(GT_IDENTIFIER, GT_IDENTIFIER, plans["plans_name"], gt_hash(dataset_json)))
    return scope


def output_reason(ctx: RunContext, out: Optional[OutputRecord], digest: Optional[str],
                  conf: ConfigurationRecord, folder: Optional[str] = None) -> Optional[str]:
    """Why this (case, data folder) must be made, or None if the ledger vouches for it as it is. `folder`: the data
    folder's path, when the caller has it (a string: this runs once per case and configuration)."""
    if out is None:
        return "new"
    if out.state != TaskState.done:
        if out.state == TaskState.pending and not out.attempts:
            return "not started yet"
        return {"running": "interrupted", "pending": "interrupted"}.get(out.state.value, f"{out.state.value} before")
    if out.input_digest != digest:
        return "input changed"
    if out.config_hash not in conf.keys():
        return "configuration changed"
    prefix = os.path.join(folder or str(ctx.layout.data_folder(conf.data_identifier)), "")
    for f in out.files or []:
        path = prefix + f["name"]
        try:
            size = os.stat(path).st_size
        except OSError:
            return f"output missing: {f['name']}"
        if size != f["size"]:
            return f"output size differs: {f['name']}"
        if ctx.settings.verify_outputs and atomic.file_digest(path) != f["sha256"]:
            return f"output checksum differs: {f['name']}"
    return None


def _units(rec: CaseRecord, files: CaseFiles, plans: dict[str, Any], conf: ConfigurationRecord) -> int:
    if conf.data_identifier == GT_IDENTIFIER:
        return 0
    target = resolve_configuration(plans, conf.configuration).get("spacing")
    return preprocess_units(rec.header, list(files.images), list(target) if target else None,
                            plans.get("transpose_forward"), plans.get("image_reader_writer"))


def plan_outputs(ctx: RunContext, cases: dict[str, CaseFiles], records: dict[str, CaseRecord],
                 plans: dict[str, Any], scope: list[ConfigurationRecord]) -> PreprocessPlan:
    plan = PreprocessPlan(scope)
    folders = {conf.data_identifier: str(ctx.layout.data_folder(conf.data_identifier)) for conf in scope}
    for name, files in cases.items():
        rec = records.get(name)
        fp = rec.fingerprint if rec else None
        if rec is None or fp is None or fp.state != TaskState.done or not rec.input_digest:
            plan.blocked[name] = f"its fingerprint {fp.state.value if fp else 'is missing'}" + \
                                 (f": {fp.error}" if fp and fp.error else "")
            continue
        targets, reasons = [], {}
        for conf in scope:
            out = rec.outputs.get(conf.data_identifier)
            if (out is not None and out.state == TaskState.quarantined and not ctx.settings.retry_quarantined
                    and out.input_digest == rec.input_digest and out.config_hash in conf.keys()):
                plan.skipped_quarantined.append((name, conf.data_identifier))
                continue
            reason = output_reason(ctx, out, rec.input_digest, conf, folders[conf.data_identifier])
            if reason:
                targets.append(Target(conf.data_identifier, conf.configuration))
                reasons[conf.data_identifier] = reason
        if targets:
            plan.work.append(OutputWork(f"pp-{name}", name, files, targets, reasons))
        else:
            plan.up_to_date += 1
    return plan


class PreprocessHandler:
    stage = "preprocess"

    def __init__(self, ctx: RunContext, plan: PreprocessPlan, records: dict[str, CaseRecord], plans: dict[str, Any],
                 dataset_json: dict[str, Any]) -> None:
        self.ctx, self.plan, self.records, self.plans, self.dataset_json = ctx, plan, records, plans, dataset_json
        self.hashes = {c.data_identifier: c.config_hash for c in plan.configurations}

    def build(self, item: QueueItem, attempt: int) -> PreprocessTask:
        w: OutputWork = item.spec
        rec = self.records[w.case]
        expected = tuple(rec.files)
        return PreprocessTask(task_id=w.task_id, case=w.case, images=w.files.images, label=w.files.label,
                              expected=expected, plans=self.plans, dataset_json=self.dataset_json,
                              targets_=tuple(w.targets),
                              staging=str(self.ctx.staging / f"{w.task_id}-{attempt}"),
                              read_cache=self.ctx.read_cache.path(w.case) if self.ctx.read_cache else "")

    def started(self, item: QueueItem) -> None:
        w: OutputWork = item.spec
        self.ctx.ledger.outputs_started(
            w.case, [(t.data_identifier, t.configuration, self.hashes[t.data_identifier]) for t in w.targets],
            self.records[w.case].input_digest or "", self.ctx.run_id, item.estimate)

    def received(self, item: QueueItem, msg: Any) -> None:
        assert isinstance(msg, OutputResult)
        w: OutputWork = item.spec
        ident, group = msg.target.data_identifier, self.ctx.group
        folder = self.ctx.layout.data_folder(ident)
        if group and group.later(w.case, folder, [f.name for f in msg.files], lambda: self.received(item, msg)):
            return
        if self.ctx.read_cache:
            self.ctx.read_cache.taken(w.case)
        place_files(list(msg.files), folder, w.case, group)
        self.ctx.ledger.output_done(
            w.case, ident, msg.target.configuration, self.ctx.run_id, self.hashes[ident],
            self.records[w.case].input_digest or "",
            [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in msg.files], msg.duration_s, msg.peak_rss)
        w.targets = [t for t in w.targets if t.data_identifier != ident]

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None:
        w: OutputWork = item.spec
        if self.ctx.read_cache:
            self.ctx.read_cache.taken(w.case)
        if w.targets:
            self.ctx.ledger.outputs_ended_badly(w.case, [t.data_identifier for t in w.targets], state, message, died,
                                                peak)

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        w: OutputWork = item.spec
        keep = {f"preprocess:{t.data_identifier}" for t in w.targets} | {"gt"}
        return {k: v for k, v in item.units.items() if k in keep}


def run_outputs(ctx: RunContext, plan: PreprocessPlan, records: dict[str, CaseRecord], plans: dict[str, Any],
                dataset_json: dict[str, Any]) -> Any:
    confs = {c.data_identifier: c for c in plan.configurations}
    rows = [(w.case, t.data_identifier, t.configuration) for w in plan.work for t in w.targets]
    ctx.ledger.ensure_outputs(rows)
    scheduler = Scheduler(ctx.workers, shrink_after_deaths=ctx.pool.on_this_machine)
    for w in plan.work:
        rec = records[w.case]
        units = {}
        for t in w.targets:
            key = "gt" if t.data_identifier == GT_IDENTIFIER else f"preprocess:{t.data_identifier}"
            units[key] = _units(rec, w.files, plans, confs[t.data_identifier])
        deaths = max((rec.outputs[t.data_identifier].deaths for t in w.targets if t.data_identifier in rec.outputs),
                     default=0)
        scheduler.add(w, ctx.estimator.estimate(units), units, deaths=deaths)
    return ctx.run_stage("Preprocess", scheduler, PreprocessHandler(ctx, plan, records, plans, dataset_json),
                         plan.up_to_date)


def unvouched_files(layout: DatasetLayout, records: dict[str, CaseRecord], data_identifiers: Iterable[str],
                    file_ending: str) -> list[Path]:
    """Files in the given data folders that no done ledger row vouches for: a case's outputs (`.b2nd`, `.pkl`, ...)
    or, in gt_segmentations, labels (`file_ending`). Training would take them for cases; nnU-Net itself empties
    these folders before it writes them."""
    vouched: dict[str, set[str]] = {ident: set() for ident in data_identifiers}
    for rec in records.values():
        for ident, out in rec.outputs.items():
            if ident in vouched and out.state == TaskState.done:
                vouched[ident].update(f["name"] for f in out.files or [])
    found = []
    for ident, names in vouched.items():
        folder = layout.data_folder(ident)
        if not folder.is_dir():
            continue
        suffixes = (file_ending,) if ident == GT_IDENTIFIER else OUTPUT_SUFFIXES
        with os.scandir(folder) as it:
            found += [Path(e.path) for e in it if e.is_file() and e.name.endswith(suffixes) and e.name not in names]
    return sorted(found)


def sweep_unvouched(ctx: RunContext, scope: list[ConfigurationRecord], file_ending: str,
                    records: dict[str, CaseRecord]) -> int:
    """Removes files in the data folders in scope that no done ledger row vouches for. Returns how many."""
    stray = unvouched_files(ctx.layout, records, [c.data_identifier for c in scope], file_ending)
    for path in stray:
        os.unlink(path)
        log.debug("removed %s: no ledger entry vouches for it", path)
    for folder in {p.parent for p in stray}:
        atomic.fsync_dir(folder)
    if stray:
        log.info("Removed %d file(s) from the data folders that no ledger entry vouches for", len(stray))
    return len(stray)


def remove_case_outputs(ctx: RunContext, case: str, record: CaseRecord, file_ending: str) -> None:
    """Deletes a removed case's files from every data folder the ledger knows, and its fingerprint result."""
    for ident, out in record.outputs.items():
        folder = ctx.layout.data_folder(ident)
        names = [f["name"] for f in out.files or []] or output_names(case, ident, file_ending)
        for name in names:
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                pass
    if record.fingerprint and record.fingerprint.result_file:
        try:
            os.unlink(ctx.layout.work / record.fingerprint.result_file)
        except FileNotFoundError:
            pass
