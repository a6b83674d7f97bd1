"""`nnresume preprocess` for one dataset: lock, ledger, run record, then the three stages, each resumable.

The run record is opened before any work and closed however the run ends: completed, completed with failures,
interrupted (a signal), or failed (an error that stops the whole run). A run that was killed outright cannot close
its record; the next run finds it still `running`, knows its process is gone because it could take the lock, and
records it as interrupted.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from sqlalchemy.exc import OperationalError

from .. import __version__
from ..config import STANDARD_CONFIGURATIONS, Paths, PreprocessSettings, check_budget, close_matches, format_bytes
from ..dataset import (
    GT_IDENTIFIER,
    CaseFiles,
    DatasetLayout,
    key_of,
    layout_for,
    list_cases,
    load_dataset_json,
    nnunetv2_version,
    orphan_labels,
)
from ..errors import DatasetError, Interrupted, NnresumeError, UsageError
from ..execution import system
from ..execution.memory import resolve_budget
from ..execution.pools.local import LocalPool
from ..execution.runner import StageStats, StopFlag
from ..geometry import read_header
from ..io.lock import DatasetLock, process_started_at
from ..ledger.models import RunStatus, TaskState
from ..ledger.repository import CaseRecord, FindingRecord, Ledger
from ..progress import add_run_log, remove_handler
from ..tasks import ClassCheckTask, IntegrityTask, ReaderTask
from . import fingerprint, outputs, planning
from .context import RunContext

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CASES_FAILED = 0, 1, 2, 3
DEFAULT_CLASSES = ("ExperimentPlanner", "DatasetFingerprintExtractor", "DefaultPreprocessor")


class DiskFullError(NnresumeError):
    pass


@dataclass
class DatasetOutcome:
    dataset: str
    status: RunStatus
    exit_code: int
    reason: Optional[str] = None
    run_id: Optional[int] = None
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # dataset-level errors (numTraining)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    duration_s: float = 0.0
    log_file: Optional[str] = None
    budget: Optional[int] = None
    peak_tree: Optional[int] = None


def _close_abandoned_runs(ledger: Ledger, layout: DatasetLayout) -> None:
    """We hold the lock, so every run still marked running is dead."""
    for r in ledger.runs_in_state(RunStatus.running):
        reason = f"process gone (PID {r.pid} on {r.host}); it was killed or the machine stopped"
        ledger.finish_run(r.id, RunStatus.interrupted, reason)
        log.warning("The previous run %d (started %s) was interrupted: %s. Resuming.", r.id,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)), reason)


def _read_missing_headers(ledger: Ledger, cases: dict[str, CaseFiles], records: dict[str, CaseRecord]) -> None:
    """Image headers (shape, spacing) of cases the ledger has none for; they size the memory estimates."""
    missing = [n for n, c in cases.items() if (n not in records or not records[n].header) and c.images]
    if not missing:
        return
    with ThreadPoolExecutor(max_workers=4) as ex:
        headers = dict(zip(missing, ex.map(lambda n: read_header(cases[n].images[0]), missing)))
    ledger.set_case_headers(headers)
    for n, h in headers.items():
        if n in records:
            records[n].header = h
        else:
            records[n] = CaseRecord(name=n, input_digest=None, header=h)


def _reader_writer(ctx: RunContext, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]) -> str:
    key = key_of({"file_ending": dataset_json["file_ending"],
                  "reader": dataset_json.get("overwrite_image_reader_writer"), "nnunetv2": ctx.nnunetv2_version})
    art = ctx.ledger.get_artifact("reader_writer")
    if art is not None and art.key == key and art.details:
        return str(art.details["name"])
    examples = tuple(c.images[0] for c in cases.values() if c.images)[:20]
    name = str(ctx.run_one(ReaderTask(f"reader-{ctx.run_id}", dataset_json, examples)).value)
    ctx.ledger.set_artifact("reader_writer", key, 0, "", ctx.run_id, {"name": name})
    return name


def _check_halted(ctx: RunContext, stats: StageStats) -> None:
    if ctx.stop:
        raise Interrupted(ctx.stop.signal_name or "signal", ctx.stop.exit_code)
    if stats.halted:
        raise DiskFullError(stats.halted)


def _dataset_problems(ctx: RunContext, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]) -> set[str]:
    """What is wrong with the dataset rather than a case's files: labels without images (each recorded as a failed
    case) and a numTraining that disagrees with the cases found (a dataset-level error). nnU-Net's preprocessing
    passes over both without a word; its integrity check rejects them. Returns the orphan labels' identifiers."""
    orphans = orphan_labels(ctx.layout.raw, dataset_json, cases)
    ending = dataset_json["file_ending"]
    for name, path in orphans.items():
        message = (f"case {name} ({path}): label has no image files in imagesTr (expected {name}_0000{ending}); "
                   "add the images or remove the label")
        ctx.ledger.case_failed_outright(name, ctx.run_id, message)
        log.error("%s", message)
    problems = []
    declared = dataset_json.get("numTraining")
    if declared is not None and declared != len(cases):
        problems.append(FindingRecord(None, "error", "num_training", str(ctx.layout.raw / "dataset.json"),
                                      f"dataset.json says numTraining={declared} but {len(cases)} training case(s) "
                                      f"were found; correct numTraining (nnU-Net's integrity check rejects this)"))
    ctx.ledger.set_dataset_findings(ctx.run_id, problems)
    for p in problems:
        log.error("%s", p.message)
    return set(orphans)


def _strict(ctx: RunContext, records: dict[str, CaseRecord]) -> None:
    """--strict: a case with warnings fails, as if its inputs were bad (redone once they change or without it)."""
    first: dict[str, str] = {}
    for f in ctx.ledger.findings():
        if f.case and f.level == "warning":
            first.setdefault(f.case, f.message)
    for name, message in first.items():
        fp = records[name].fingerprint if name in records else None
        if fp is not None and fp.state == TaskState.done:
            ctx.ledger.fingerprint_ended_badly(name, TaskState.failed, f"--strict: {message}", died=False)
            log.error("--strict: %s", message)


def _stages(ctx: RunContext, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]) -> dict[str, CaseRecord]:
    """The three stages; returns the ledger's cases as they are at the end."""
    s, layout, ledger = ctx.settings, ctx.layout, ctx.ledger
    if (s.planner, s.fingerprint_extractor, s.preprocessor_name) != DEFAULT_CLASSES:
        ctx.run_one(ClassCheckTask(f"classes-{ctx.run_id}", s.planner, s.fingerprint_extractor,
                                   s.preprocessor_name))
    orphans = _dataset_problems(ctx, dataset_json, cases)
    records = ledger.load_cases()
    gone = [n for n in records if n not in cases and n not in orphans]
    if gone:
        for n in gone:
            outputs.remove_case_outputs(ctx, n, records[n], dataset_json["file_ending"])
        ledger.remove_cases(gone)
        log.info("Removed the outputs of %d case(s) no longer in the raw dataset: %s", len(gone),
                 ", ".join(gone[:10]) + (" ..." if len(gone) > 10 else ""))
        records = {n: r for n, r in records.items() if n not in gone}
    if s.verify_dataset_integrity:
        log.info("Checking dataset integrity with nnU-Net's verify_dataset_integrity")
        ctx.run_one(IntegrityTask(f"integrity-{ctx.run_id}", str(layout.raw), ctx.workers))

    fplan = fingerprint.plan_fingerprints(ctx, cases, records, dataset_json)
    if fplan.work:
        ctx.get_pool()  # the forkserver imports nnunetv2 while we read headers
        _read_missing_headers(ledger, cases, records)
        reader = _reader_writer(ctx, dataset_json, cases)
        log.info("Fingerprint: %d case(s) to analyse, %d up to date", len(fplan.work), fplan.up_to_date)
        stats = fingerprint.run_fingerprints(ctx, fplan, records, dataset_json, reader)
        _check_halted(ctx, stats)
        records = ledger.load_cases()
    if s.strict:
        _strict(ctx, records)
        records = ledger.load_cases()
    fingerprint_sha, _ = fingerprint.aggregate(ctx, fplan, cases, dataset_json, records)
    if ctx.stop:
        raise Interrupted(ctx.stop.signal_name or "signal", ctx.stop.exit_code)

    plans_path, plans = _plan(ctx, fingerprint_sha, dataset_json, cases)
    scope = outputs.configurations_in_scope(ctx, plans, dataset_json)
    ledger.set_configurations(scope)
    pplan = outputs.plan_outputs(ctx, cases, records, plans, scope)
    if pplan.blocked:
        rows = [(n, c.data_identifier, c.configuration) for n in pplan.blocked for c in scope]
        ledger.ensure_outputs(rows)
        for n, why in pplan.blocked.items():
            ledger.outputs_ended_badly(n, [c.data_identifier for c in scope], TaskState.failed,
                                       f"case {n}: not preprocessed because {why}", died=False)
    if pplan.work:
        ctx.get_pool()
        names = ", ".join(c.configuration for c in scope if c.data_identifier != GT_IDENTIFIER)
        log.info("Preprocess (%s): %d case(s) to do, %d up to date", names, len(pplan.work), pplan.up_to_date)
        stats = outputs.run_outputs(ctx, pplan, records, plans, dataset_json)
        _check_halted(ctx, stats)
    if pplan.work or pplan.blocked:
        records = ledger.load_cases()
    outputs.sweep_unvouched(ctx, scope, dataset_json["file_ending"], records)
    return records


def _plan(ctx: RunContext, fingerprint_sha: str, dataset_json: dict[str, Any],
          cases: dict[str, CaseFiles]) -> tuple[Any, dict[str, Any]]:
    current = planning.up_to_date_plans(ctx, fingerprint_sha)
    if current is not None:
        return current
    reader = _reader_writer(ctx, dataset_json, cases)
    return planning.plan(ctx, fingerprint_sha, reader)


def failure_lines(records: dict[str, CaseRecord], scope_idents: Optional[set[str]] = None,
                  limit: int = 20) -> list[str]:
    lines = []
    for rec in records.values():
        fp = rec.fingerprint
        if fp is not None and fp.state in (TaskState.failed, TaskState.quarantined):
            lines.append(f"[fingerprint {fp.state.value}] {fp.error}")
            continue
        for ident, out in rec.outputs.items():
            if scope_idents is not None and ident not in scope_idents:
                continue
            if out.state in (TaskState.failed, TaskState.quarantined):
                lines.append(f"[{ident} {out.state.value}] {out.error}")
                break
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def check_configuration_names(settings: PreprocessSettings, layout: DatasetLayout) -> None:
    """A -c name no plans can contain is a typo: say so before any work. Known names are those of nnU-Net's own
    planners and of plans files already in the preprocessed folder; with a custom planner and no plans yet, the
    check waits for the plans (outputs.configurations_in_scope)."""
    if not settings.explicit_configurations:
        return
    known = set(STANDARD_CONFIGURATIONS)
    for path in layout.preprocessed.glob("*.json") if layout.preprocessed.is_dir() else []:
        try:
            known.update(json.loads(path.read_text()).get("configurations", {}))
        except (OSError, ValueError, AttributeError):
            continue
    standard_planner = settings.planner == "ExperimentPlanner" or settings.planner.startswith("nnUNetPlanner")
    for name in settings.configurations:
        if name not in known and standard_planner:
            raise UsageError(f"-c {name}: no such configuration ({settings.planner} makes "
                             f"{', '.join(STANDARD_CONFIGURATIONS)})", close_matches(name, sorted(known)))


def run_dataset(settings: PreprocessSettings, paths: Paths, name_or_id: str, stop: StopFlag,
                pool: Optional[LocalPool] = None) -> DatasetOutcome:
    """One dataset's run. `pool` may be shared across datasets (the caller shuts it down); else one is made here."""
    t0 = time.time()
    layout = layout_for(name_or_id, paths.raw, paths.preprocessed)
    os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = paths.raw, paths.preprocessed
    dataset_json = load_dataset_json(layout.raw)
    cases = list_cases(layout.raw, dataset_json)
    if not cases:
        raise DatasetError(f"no training cases in {layout.raw / 'imagesTr'}",
                           f"expected files named <case>_0000{dataset_json['file_ending']}")
    check_configuration_names(settings, layout)
    available = system.available_memory()
    budget = resolve_budget(settings.max_ram.bytes, settings.max_ram.fraction, available)
    check_budget(budget, settings.max_ram)
    layout.preprocessed.mkdir(parents=True, exist_ok=True)
    lock = DatasetLock(layout.lock, layout.name)
    lock.acquire()
    log_handler = None
    ctx: Optional[RunContext] = None
    outcome = DatasetOutcome(layout.name, RunStatus.running, EXIT_ERROR)
    try:
        ledger = Ledger.open(str(layout.ledger))
        _close_abandoned_runs(ledger, layout)
        arguments = {"argv": sys.argv[1:], "dataset": layout.name,
                     "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if k == "max_ram" else v)
                                  for k, v in vars(settings).items()}}
        run_id = ledger.start_run("preprocess", arguments, socket.gethostname(), os.getpid(),
                                  process_started_at(os.getpid()), nnunetv2_version(), __version__, None)
        outcome.run_id = run_id
        log_path = layout.logs / f"run-{run_id}.log"
        log_handler = add_run_log(log_path)
        outcome.log_file = str(log_path)
        workers = settings.num_workers or system.usable_cpus()
        ledger.update_run(run_id, log_file=str(log_path), workers=workers, budget_bytes=budget)
        limit = system.memory_limit()
        if budget > limit:
            log.warning("--max-ram %s is more than this machine allows (%s); the machine's limit will bite first",
                        format_bytes(budget), format_bytes(limit))
        log.info("%s: %d case(s); up to %d worker(s); memory budget %s (%s available)", layout.name, len(cases),
                 workers, format_bytes(budget), format_bytes(available))
        ctx = RunContext(settings, layout, ledger, run_id, stop, budget, workers, nnunetv2_version(), pool=pool,
                         owns_pool=pool is None)
        outcome.budget = budget
        shutil.rmtree(layout.staging, ignore_errors=True)  # the lock is ours: nothing else writes there
        ctx.staging.mkdir(parents=True, exist_ok=True)
        reset = ledger.reset_running()
        if reset:
            log.info("%d task(s) left running by the interrupted run will be redone", reset)
        try:
            records = _stages(ctx, dataset_json, cases)
        except Interrupted as e:
            outcome.status, outcome.exit_code, outcome.reason = RunStatus.interrupted, e.exit_code, str(e.message)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"no space left on device writing {e.filename or layout.preprocessed}",
                                    "free some space and run the same command again") from e
            raise
        except OperationalError as e:
            if "disk is full" in str(e.orig):
                raise DiskFullError(f"no space left on device writing the ledger {layout.ledger}",
                                    "free some space and run the same command again") from e
            raise
        else:
            scope = {c.data_identifier for c in ledger.configurations()}
            outcome.failures = failure_lines(records, scope)
            findings = ledger.findings()
            outcome.problems = [f.message for f in findings if f.case is None and f.level == "error"]
            outcome.warnings = [f.message for f in findings if f.level == "warning"]
            if outcome.failures or outcome.problems:
                outcome.status, outcome.exit_code = RunStatus.completed_with_failures, EXIT_CASES_FAILED
                outcome.reason = "; ".join(x for x in (f"{len(outcome.failures)} case(s) failed" if outcome.failures
                                                       else "", outcome.problems[0] if outcome.problems else "") if x)
            else:
                outcome.status, outcome.exit_code = RunStatus.completed, EXIT_OK
    except NnresumeError as e:
        outcome.status, outcome.exit_code, outcome.reason = RunStatus.failed, e.exit_code, e.message
        raise
    except BaseException as e:
        outcome.status, outcome.exit_code = RunStatus.failed, EXIT_ERROR
        outcome.reason = f"internal error: {type(e).__name__}: {e}"
        log.debug("%s", traceback.format_exc())
        raise
    finally:
        if ctx is not None:
            ctx.shutdown()
            shutil.rmtree(ctx.staging, ignore_errors=True)
            outcome.peak_tree = ctx.peak_tree or None
            try:
                ctx.ledger.finish_run(ctx.run_id, outcome.status, outcome.reason, ctx.peak_tree or None)
                outcome.counts = ctx.ledger.state_counts()
            except Exception as e:  # e.g. the disk is still full: the next run records this one as interrupted
                log.warning("could not record the end of run %d in the ledger: %s", ctx.run_id, getattr(e, "orig", e))
            finally:
                ctx.ledger.close()
        outcome.duration_s = time.time() - t0
        remove_handler(log_handler)
        lock.release()
    return outcome
