"""`nnresume preprocess` for one dataset: checks that need no work, then the three stages in a run session.

The session (session.py) takes the lock, keeps the run record and maps how the run ended to an exit code; here are
the dataset's own steps: the class names, the dataset-level problems (orphan labels, numTraining), removed cases, the
fingerprint, the plans, the outputs, and the summary of failures and warnings.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

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
from ..errors import EXIT_CASES_FAILED, EXIT_OK, DatasetError, DiskFullError, Interrupted, UsageError
from ..execution import system
from ..execution.memory import resolve_budget
from ..execution.pools.base import Pool
from ..execution.runner import StageStats, StopFlag
from ..geometry import read_header
from ..io.readcache import ReadCache
from ..ledger.models import RunStatus, TaskState
from ..ledger.repository import CaseRecord, FindingRecord, Ledger
from ..session import Outcome, run_session
from ..tasks import ClassCheckTask, IntegrityTask, ReaderTask
from . import fingerprint, given, outputs, planning
from .context import RunContext

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("ExperimentPlanner", "DatasetFingerprintExtractor", "DefaultPreprocessor")


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


def _reloaded(ledger: Ledger, records: dict[str, CaseRecord]) -> dict[str, CaseRecord]:
    """The ledger's cases read again, the old records dropped first: at 25,000 cases a copy is ~150 MiB of the
    orchestrator's memory, and two side by side made its peak."""
    records.clear()
    return ledger.load_cases()


def _check_given_preprocessors(ctx: RunContext, path: Any, plans: dict[str, Any]) -> None:
    """The preprocessor classes the given plans name for the configurations in scope exist where nnU-Net looks."""
    scope = [c for c in ctx.settings.configurations if c in plans["configurations"]]
    for name in sorted(given.preprocessor_names(plans, scope) - {DEFAULT_CLASSES[2]}):
        try:
            ctx.run_one(ClassCheckTask(f"classes-{ctx.run_id}", DEFAULT_CLASSES[0], DEFAULT_CLASSES[1], name))
        except UsageError as e:
            raise UsageError(f"{path.name}: {e.message.lstrip('-')}", e.hint) from None


def _stages(ctx: RunContext, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]) -> dict[str, CaseRecord]:
    """The stages `settings.steps` asks for (with given plans: the fingerprints, then the outputs); returns the
    ledger's cases as they are at the end."""
    s, layout, ledger = ctx.settings, ctx.layout, ctx.ledger
    given_plans = None
    if s.plans_name is not None:
        given_plans = given.load(layout, s.plans_name, dataset_json, s.configurations, s.explicit_configurations)
        _check_given_preprocessors(ctx, *given_plans)
    elif (s.planner, s.fingerprint_extractor, s.preprocessor_name) != DEFAULT_CLASSES:
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
        _read_missing_headers(ledger, cases, records)
        reader = _reader_writer(ctx, dataset_json, cases)
        log.info("Fingerprint: %d case(s) to analyse, %d up to date", len(fplan.work), fplan.up_to_date)
        stats = fingerprint.run_fingerprints(ctx, fplan, records, dataset_json, reader)
        _check_halted(ctx, stats)
        records = _reloaded(ledger, records)
    if s.strict:
        _strict(ctx, records)
        records = _reloaded(ledger, records)
    if given_plans is not None:  # used as they are: no dataset fingerprint, no planning
        plans_path, plans = given_plans
        planning.copy_dataset_json(ctx)
        log.info("Preprocessing against the given plans %s (never written)", plans_path)
    else:
        fingerprint_sha, _ = fingerprint.aggregate(ctx, fplan, cases, dataset_json, records)
        if ctx.stop:
            raise Interrupted(ctx.stop.signal_name or "signal", ctx.stop.exit_code)
        if s.steps == "fingerprint":
            return records
        plans_path, plans = _plan(ctx, fingerprint_sha, dataset_json, cases)
        if s.steps == "plan":
            return records
    scope = outputs.configurations_in_scope(ctx, plans, dataset_json)
    planning.use(ctx, plans_path, plans, [c.configuration for c in scope if c.data_identifier != GT_IDENTIFIER])
    ledger.set_configurations(scope)
    rekeyed = ledger.rekey_outputs(scope)
    if rekeyed:
        log.info("%d output(s) keyed on the configurations' current hash (the same outputs)", rekeyed)
    pplan = outputs.plan_outputs(ctx, cases, records, plans, scope)
    if ctx.read_cache:  # copies of cases whose outputs are up to date (a rerun that redid every fingerprint)
        ctx.read_cache.keep_only({w.case for w in pplan.work})
    if pplan.blocked:
        rows = [(n, c.data_identifier, c.configuration) for n in pplan.blocked for c in scope]
        ledger.ensure_outputs(rows)
        for n, why in pplan.blocked.items():
            ledger.outputs_ended_badly(n, [c.data_identifier for c in scope], TaskState.failed,
                                       f"case {n}: not preprocessed because {why}", died=False)
    if pplan.work:
        names = ", ".join(c.configuration for c in scope if c.data_identifier != GT_IDENTIFIER)
        log.info("Preprocess (%s): %d case(s) to do, %d up to date", names, len(pplan.work), pplan.up_to_date)
        stats = outputs.run_outputs(ctx, pplan, records, plans, dataset_json)
        _check_halted(ctx, stats)
    if pplan.work or pplan.blocked:
        records = _reloaded(ledger, records)
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


def _summarize(ctx: RunContext, records: dict[str, CaseRecord], outcome: Outcome) -> None:
    """A finished run's failures, dataset problems and warnings, and the status and exit code they give."""
    scope = {c.data_identifier for c in ctx.ledger.configurations()}
    outcome.failures = failure_lines(records, scope)
    findings = ctx.ledger.findings()
    outcome.problems = [f.message for f in findings if f.case is None and f.level == "error"]
    outcome.warnings = [f.message for f in findings if f.level == "warning"]
    if outcome.failures or outcome.problems:
        outcome.status, outcome.exit_code = RunStatus.completed_with_failures, EXIT_CASES_FAILED
        reasons = ([f"{len(outcome.failures)} case(s) failed"] if outcome.failures else []) + outcome.problems[:1]
        outcome.reason = "; ".join(reasons)
    else:
        outcome.status, outcome.exit_code = RunStatus.completed, EXIT_OK


def run_dataset(settings: PreprocessSettings, paths: Paths, name_or_id: str, stop: StopFlag, pool: Pool) -> Outcome:
    """One dataset's run in a run session (session.py). `pool` runs the tasks; the caller starts and stops it."""
    layout = layout_for(name_or_id, paths.raw, paths.preprocessed)
    os.environ["nnUNet_raw"], os.environ["nnUNet_preprocessed"] = paths.raw, paths.preprocessed
    dataset_json = load_dataset_json(layout.raw)
    cases = list_cases(layout.raw, dataset_json)
    if not cases:
        raise DatasetError(f"no training cases in {layout.raw / 'imagesTr'}",
                           f"expected files named <case>_0000{dataset_json['file_ending']}")
    if settings.plans_name is not None:  # what can be wrong with given plans is said before anything is written
        given.load(layout, settings.plans_name, dataset_json, settings.configurations,
                   settings.explicit_configurations)
    else:
        check_configuration_names(settings, layout)
    available = system.available_memory()
    budget = resolve_budget(settings.max_ram.bytes, settings.max_ram.fraction, available,
                            system.cgroup_is_tighter())
    check_budget(budget, settings.max_ram)
    workers = settings.num_workers or system.usable_cpus()
    layout.preprocessed.mkdir(parents=True, exist_ok=True)
    arguments = {"dataset": layout.name,
                 "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if k == "max_ram" else v)
                              for k, v in vars(settings).items()}}
    with run_session(layout.name, layout.ledger, layout.work, "preprocess", arguments, workers=workers,
                     budget_bytes=budget) as session:
        session.outcome.budget = budget
        limit = system.memory_limit()
        if budget > limit and pool.on_this_machine:
            log.warning("--max-ram %s is more than this machine allows (%s); the machine's limit will bite first",
                        format_bytes(budget), format_bytes(limit))
        log.info("%s: %d case(s); up to %d worker(s); memory budget %s (%s available)", layout.name, len(cases),
                 workers, format_bytes(budget), format_bytes(available))
        ctx = RunContext(settings, layout, session, stop, budget, workers, nnunetv2_version(), pool)
        ctx.read_cache = ReadCache(session.staging, budget, enabled=pool.on_this_machine)
        try:
            records = _stages(ctx, dataset_json, cases)
            _summarize(ctx, records, session.outcome)
        finally:
            pool.stop_all()  # this dataset's workers; the pool itself may serve the next dataset
            ctx.read_cache.remove()
    return session.outcome
