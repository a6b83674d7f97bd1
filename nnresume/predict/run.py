"""`nnresume predict`: every input case through a trained model, resumable, in a run session.

The output folder is the place of the run: its ledger (`OUTPUT/nnresume.sqlite`), lock, logs and staging folder
(`OUTPUT/.nnresume`). A case is predicted by one task in a worker (worker/inference/case.py) that reads, preprocesses
and exports it with nnU-Net's own code into staging; its sliding window runs in the run's one device process, which
holds the network (predict/device_owner.py, worker/inference/device.py). Here the case's files are renamed into the
output folder and committed to the ledger (preprocess/context.py: `place_files`, the group commit), in the row (case,
"prediction") whose configuration hash is the model key (predict/model.py) and whose input digest is the case's.

A case is skipped only when that row is done for the same model key and input digest and its files exist with the
recorded sizes; anything else is redone: new, interrupted, failed before, input changed, model changed, output
missing or cut short. A quarantined case (three worker deaths) waits for --retry-quarantined or a change.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import PreprocessSettings, check_budget, format_bytes
from ..dataset import LEDGER_NAME, DatasetLayout, nnunetv2_version
from ..errors import EXIT_CASES_FAILED, EXIT_OK, DatasetError, DiskFullError, Interrupted, UsageError
from ..execution import system
from ..execution.memory import resolve_budget
from ..execution.pools.local import LocalPool
from ..execution.runner import StopFlag, stop_on_signals
from ..execution.scheduler import QueueItem, Scheduler
from ..geometry import header_voxels, read_header
from ..io import atomic
from ..ledger.models import RunStatus, TaskState
from ..ledger.repository import CaseRecord, ConfigurationRecord, OutputRecord
from ..preprocess.context import RunContext, place_files
from ..session import Outcome, log_summary, run_session
from ..tasks import DeviceLink, OutputResult, PredictTask, Target
from .cases import hash_inputs, list_input_cases
from .device_owner import DeviceOwner
from .model import PREDICTION, Model, PredictSettings, resolve_model

log = logging.getLogger(__name__)

# a case's memory that does not grow with its size: the sliding window's working memory in the device process (one
# patch through the network, counted as the case's while it is served) and the worker's own
CASE_FIXED = 256 * 2**20
# imported by the forkserver, so that the device process and every worker share nnU-Net's inference code
PRELOAD = ("nnresume.worker.inference.case", "nnresume.worker.inference.device")


@dataclass
class CaseWork:
    task_id: str
    case: str
    images: tuple[str, ...]
    reason: str


@dataclass
class PredictPlan:
    work: list[CaseWork] = field(default_factory=list)
    up_to_date: int = 0
    skipped_quarantined: list[str] = field(default_factory=list)


def prediction_reason(out: Optional[OutputRecord], digest: str, model: Model, folder: Path) -> Optional[str]:
    """Why this case must be predicted, or None if the ledger vouches for its files as they are."""
    if out is None:
        return "new"
    if out.state != TaskState.done:
        if out.state == TaskState.pending:  # never started, interrupted, or withdrawn by verify
            return out.error or ("interrupted" if out.attempts else "not started yet")
        return "interrupted" if out.state == TaskState.running else f"{out.state.value} before"
    if out.input_digest != digest:
        return "input changed"
    if out.config_hash != model.spec.key:
        return "model changed"
    for f in out.files or []:
        try:
            size = (folder / f["name"]).stat().st_size
        except OSError:
            return f"output missing: {f['name']}"
        if size != f["size"]:
            return f"output size differs: {f['name']}"
    return None


def plan_predictions(settings: PredictSettings, cases: dict[str, tuple[str, ...]],
                     inputs: dict[str, tuple[str, Any]], records: dict[str, CaseRecord], model: Model,
                     folder: Path) -> PredictPlan:
    plan = PredictPlan()
    for name, images in cases.items():
        if name not in inputs:
            continue
        digest = inputs[name][0]
        rec = records.get(name)
        out = rec.outputs.get(PREDICTION) if rec else None
        if (out is not None and out.state == TaskState.quarantined and not settings.retry_quarantined
                and out.input_digest == digest and out.config_hash == model.spec.key):
            plan.skipped_quarantined.append(name)
            continue
        reason = prediction_reason(out, digest, model, folder)
        if reason:
            plan.work.append(CaseWork(f"pred-{name}", name, images, reason))
        else:
            plan.up_to_date += 1
    return plan


class PredictHandler:
    stage = "predict"

    def __init__(self, ctx: RunContext, model: Model, inputs: dict[str, tuple[str, Any]], folder: Path,
                 device: DeviceLink) -> None:
        self.ctx, self.model, self.inputs, self.folder, self.device = ctx, model, inputs, folder, device
        self.target = Target(PREDICTION, model.configuration)

    def build(self, item: QueueItem, attempt: int) -> PredictTask:
        w: CaseWork = item.spec
        return PredictTask(task_id=w.task_id, case=w.case, images=w.images, expected=tuple(self.inputs[w.case][1]),
                           model=self.model.spec, target=self.target, num_channels=self.model.num_channels,
                           file_ending=self.model.file_ending,
                           staging=str(self.ctx.staging / f"{w.task_id}-{attempt}"), device=self.device)

    def started(self, item: QueueItem) -> None:
        w: CaseWork = item.spec
        self.ctx.ledger.outputs_started(w.case, [(PREDICTION, self.model.configuration, self.model.spec.key)],
                                        self.inputs[w.case][0], self.ctx.run_id, item.estimate)

    def received(self, item: QueueItem, msg: Any) -> None:
        assert isinstance(msg, OutputResult)
        w: CaseWork = item.spec
        group = self.ctx.group
        if group and group.later(w.case, self.folder, [f.name for f in msg.files], lambda: self.received(item, msg)):
            return
        place_files(list(msg.files), self.folder, w.case, group)
        self.ctx.ledger.output_done(
            w.case, PREDICTION, self.model.configuration, self.ctx.run_id, self.model.spec.key,
            self.inputs[w.case][0], [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in msg.files],
            msg.duration_s, msg.peak_rss)

    def ended_badly(self, item: QueueItem, state: TaskState, message: str, died: bool, peak: Optional[int]) -> None:
        w: CaseWork = item.spec
        self.ctx.ledger.outputs_ended_badly(w.case, [PREDICTION], state, message, died, peak)

    def remaining_units(self, item: QueueItem) -> dict[str, int]:
        return item.units


def _units(images: tuple[str, ...], model: Model) -> int:
    """A case's size for its memory estimate: its voxels times (channels + output channels), as read; the
    estimator learns the bytes per unit from the cases that finish."""
    voxels = header_voxels(read_header(images[0])) if images else None
    if not voxels:
        voxels = sum(os.path.getsize(p) for p in images if os.path.exists(p))
    labels = model.dataset_json.get("labels", {})
    return int(voxels) * (max(1, len(images)) + max(2, len(labels)))


def _write_model_files(model: Model, folder: Path, staging: Path) -> None:
    """plans.json and dataset.json beside the predictions, as nnUNetv2_predict leaves them (postprocessing and
    ensembling read them); written only when they differ."""
    for name, content in (("plans.json", model.plans), ("dataset.json", model.dataset_json)):
        final = folder / name
        text = json.dumps(content, indent=4)
        try:
            if final.read_text() == text:
                continue
        except (OSError, UnicodeDecodeError):
            pass
        with atomic.staged_path(staging, final) as tmp:
            Path(tmp).write_text(text)


def _summarize(records: dict[str, CaseRecord], cases: dict[str, tuple[str, ...]], outcome: Outcome) -> None:
    lines = []
    for name in cases:
        out = records[name].outputs.get(PREDICTION) if name in records else None
        if out is not None and out.state in (TaskState.failed, TaskState.quarantined):
            lines.append(f"[{out.state.value}] {out.error}")
    outcome.failures = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    if lines:
        outcome.status, outcome.exit_code = RunStatus.completed_with_failures, EXIT_CASES_FAILED
        outcome.reason = f"{len(lines)} case(s) failed"
    else:
        outcome.status, outcome.exit_code = RunStatus.completed, EXIT_OK


def _check_device(device: str) -> None:
    """-device cuda (nnU-Net's default) on a machine without an NVIDIA driver would fail every case: say so once,
    before any work (without importing torch here)."""
    if device == "cuda" and not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")):
        raise UsageError("-device cuda: no NVIDIA driver on this machine", "use -device cpu")


def _inputs(settings: PredictSettings, version: str) -> tuple[Model, Path, dict[str, tuple[str, ...]]]:
    model = resolve_model(settings, version)
    source = Path(settings.input_folder).resolve()
    if not source.is_dir():
        raise UsageError(f"input folder {source} does not exist")
    cases = list_input_cases(source, model.file_ending)
    if not cases:
        raise DatasetError(f"no input files in {source} ending in {model.file_ending}",
                           f"name them <case>_0000{model.file_ending}, one file per channel, as for nnUNetv2_predict")
    return model, source, cases


def dry_run(settings: PredictSettings) -> str:
    """Which cases a run would predict and why; writes nothing (the ledger, if any, is only read)."""
    from ..ledger.repository import Ledger

    model, _, cases = _inputs(settings, nnunetv2_version())
    folder = Path(settings.output_folder).resolve()
    records: dict[str, CaseRecord] = {}
    if (folder / LEDGER_NAME).is_file():
        ledger = Ledger.open(str(folder / LEDGER_NAME), create=False)
        try:
            records = ledger.load_cases()
        finally:
            ledger.close()
    inputs, unreadable = hash_inputs(cases, records, model.file_ending)
    plan = plan_predictions(settings, cases, inputs, records, model, folder)
    lines = [f"{folder}: {len(cases)} case(s); {len(plan.work)} to predict, {plan.up_to_date} up to date"]
    lines += [f"  {w.case}: {w.reason}" for w in plan.work]
    lines += [f"  {message}" for message in unreadable.values()]
    lines += [f"  {name}: quarantined (--retry-quarantined tries it again)" for name in plan.skipped_quarantined]
    return "\n".join(lines)


def predict(settings: PredictSettings, stop: StopFlag, pool: LocalPool) -> Outcome:
    """One prediction run in a run session (session.py). `pool` runs the tasks; the caller starts and stops it."""
    version = nnunetv2_version()
    _check_device(settings.device)
    model, source, cases = _inputs(settings, version)
    folder = Path(settings.output_folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    available = system.available_memory()
    budget = resolve_budget(settings.max_ram.bytes, settings.max_ram.fraction, available,
                            system.cgroup_is_tighter())
    check_budget(budget, settings.max_ram)
    workers = settings.num_workers
    # the output folder in the place of a dataset's preprocessed folder: OUT/nnresume.sqlite, OUT/.nnresume/
    layout = DatasetLayout(name=folder.name, raw=source, preprocessed=folder)
    arguments = {"model": str(model.spec.folder), "model_key": model.spec.key, "input": str(source),
                 "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if k == "max_ram" else v)
                              for k, v in vars(settings).items()}}
    with run_session(str(folder), layout.ledger, layout.work, "predict", arguments, workers=workers,
                     budget_bytes=budget) as session:
        session.outcome.budget = budget
        log.info("%s: %d case(s); model %s (folds %s); up to %d worker(s); memory budget %s (%s available)",
                 folder, len(cases), model.spec.folder, ", ".join(model.spec.folds), workers, format_bytes(budget),
                 format_bytes(available))
        # the settings the shared stage machinery reads: grace period, oversize, progress bar
        shared = PreprocessSettings(datasets=(), progress_bar=settings.progress_bar,
                                    grace_seconds=settings.grace_seconds, allow_oversize=settings.allow_oversize,
                                    retry_quarantined=settings.retry_quarantined)
        ctx = RunContext(shared, layout, session, stop, budget, workers, version, pool)
        try:
            _run(ctx, pool, settings, model, cases, folder)
            _summarize(ctx.ledger.load_cases(), cases, session.outcome)
        finally:
            pool.stop_all()
    return session.outcome


def _run(ctx: RunContext, pool: LocalPool, settings: PredictSettings, model: Model,
         cases: dict[str, tuple[str, ...]], folder: Path) -> None:
    ledger = ctx.ledger
    records = ledger.load_cases()
    inputs, unreadable = hash_inputs(cases, records, model.file_ending)
    ledger.set_case_inputs(inputs)
    ledger.set_configurations([ConfigurationRecord(PREDICTION, model.configuration,
                                                   str(model.plans.get("plans_name", "")), model.spec.key)])
    _write_model_files(model, folder, ctx.staging)
    plan = plan_predictions(settings, cases, inputs, records, model, folder)
    rows = [(n, PREDICTION, model.configuration) for n in [*(w.case for w in plan.work), *unreadable]]
    ledger.ensure_outputs(rows)
    for name, message in unreadable.items():
        ledger.outputs_ended_badly(name, [PREDICTION], TaskState.failed, message, died=False)
        log.error("%s", message)
    for name in plan.skipped_quarantined:
        log.warning("case %s: quarantined by an earlier run; --retry-quarantined tries it again", name)
    if not plan.work:
        log.info("Predict: nothing to do, %d case(s) up to date", plan.up_to_date)
        return
    log.info("Predict: %d case(s) to do, %d up to date", len(plan.work), plan.up_to_date)
    scheduler = Scheduler(ctx.workers, shrink_after_deaths=ctx.pool.on_this_machine)
    fixed = CASE_FIXED
    for w in plan.work:
        out = records[w.case].outputs.get(PREDICTION) if w.case in records else None
        units = {f"preprocess:{PREDICTION}": _units(w.images, model)}
        scheduler.add(w, ctx.estimator.estimate(units) + fixed, units, deaths=out.deaths if out else 0, fixed=fixed)
    device = DeviceOwner(pool, model.spec, ctx.staging)
    device.start()  # it loads the network while the first workers read and preprocess
    try:
        stats = ctx.run_stage("Predict", scheduler, PredictHandler(ctx, model, inputs, folder, device.link),
                              plan.up_to_date)
    finally:
        device.close()
    if device.restarts:
        log.warning("Predict: the device process died and was started again %d time(s)", device.restarts)
    if ctx.stop:
        raise Interrupted(ctx.stop.signal_name or "signal", ctx.stop.exit_code)
    if stats.halted:
        raise DiskFullError(stats.halted)


def predict_cases(settings: PredictSettings) -> int:
    """A prediction run with a local pool and signals turned into an orderly stop; returns the exit code."""
    with stop_on_signals() as stop:
        # nnU-Net's inference code is imported once, by the forkserver: the device process and the workers share it
        pool = LocalPool(preload=PRELOAD)
        pool.warm_up()
        try:
            outcome = predict(settings, stop, pool)
            log_summary(outcome)
            return int(outcome.exit_code)
        finally:
            pool.shutdown()
