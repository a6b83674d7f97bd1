"""`nnresume preprocess --dry-run`: what a run would do, and why, without doing or changing anything.

It makes the same decisions as a real run from the same ledger, with two limits it says out loud: a file whose size
or mtime changed would be hashed to learn whether its content changed (a dry run does not hash), and when the dataset
fingerprint may change, the plans and so the configuration hashes may change too.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import Paths, PreprocessSettings
from ..dataset import (
    GT_IDENTIFIER,
    DatasetLayout,
    layout_for,
    list_cases,
    load_dataset_json,
    nnunetv2_version,
    orphan_labels,
)
from ..ledger.repository import ArtifactRecord, Ledger
from ..preprocess import fingerprint, given, outputs, planning


@dataclass
class _DryContext:
    """What the stage planners read from a run context, without a run."""

    settings: PreprocessSettings
    layout: DatasetLayout
    ledger: Any
    nnunetv2_version: str
    run_id: int = 0


class _NoLedger:
    def get_artifact(self, name: str) -> Optional[ArtifactRecord]:
        return None


def _category(reason: str) -> str:
    return reason.split(":", 1)[0]


@dataclass
class DryRun:
    dataset: str
    cases: int
    removed: list[str] = field(default_factory=list)
    fingerprint: dict[str, list[str]] = field(default_factory=dict)  # reason -> cases
    fingerprint_up_to_date: int = 0
    plans: str = ""
    outputs: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # configuration -> reason -> cases
    outputs_up_to_date: int = 0
    blocked: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the run would report these as failed
    plan_changes: list[str] = field(default_factory=list)  # since the outputs were last made from these plans
    notes: list[str] = field(default_factory=list)


def plan_dry_run(settings: PreprocessSettings, paths: Paths, name_or_id: str) -> DryRun:
    layout = layout_for(name_or_id, paths.raw, paths.preprocessed)
    dataset_json = load_dataset_json(layout.raw)
    cases = list_cases(layout.raw, dataset_json)
    ledger = Ledger.open(str(layout.ledger), create=False) if layout.ledger.is_file() else None
    try:
        records = ledger.load_cases() if ledger else {}
        ctx = _DryContext(settings, layout, ledger or _NoLedger(), nnunetv2_version())
        out = DryRun(layout.name, len(cases))
        orphans = orphan_labels(layout.raw, dataset_json, cases)
        out.problems = [f"case {n} ({p}): label has no image files in imagesTr" for n, p in orphans.items()]
        if dataset_json.get("numTraining") is not None and dataset_json["numTraining"] != len(cases):
            out.problems.append(f"dataset.json says numTraining={dataset_json['numTraining']} but {len(cases)} "
                                "training case(s) were found")
        out.removed = sorted(n for n in records if n not in cases and n not in orphans)
        fplan = fingerprint.plan_fingerprints(ctx, cases, records, dataset_json)  # type: ignore[arg-type]
        for w in fplan.work:
            out.fingerprint.setdefault(_category(w.reason), []).append(w.case)
        out.fingerprint_up_to_date = fplan.up_to_date
        if any("changed" in r for r in out.fingerprint):
            out.notes.append("files whose size or time changed would be hashed: if their content is unchanged, "
                             "nothing more is redone for them")

        if settings.steps == "fingerprint":
            out.plans = "not made (the fingerprint step alone)"
            return out
        art = ctx.ledger.get_artifact(fingerprint.FINGERPRINT_JSON)
        fp_ok = art is not None and layout.fingerprint_json.is_file() and not fplan.work and not out.removed
        current = planning.up_to_date_plans(ctx, art.sha256) if fp_ok and art else None  # type: ignore[arg-type]
        plans: Optional[dict[str, Any]] = None
        if settings.plans_name is not None:
            path, plans = given.load(layout, settings.plans_name, dataset_json, settings.configurations,
                                     settings.explicit_configurations)
            out.plans = f"given: {path.name}, used as it is"
        elif current is not None:
            out.plans = f"up to date ({current[0].name})"
            plans = current[1]
        else:
            out.plans = ("made again only if the dataset fingerprint changes" if fplan.work or out.removed
                         else "would be made: no plans recorded for these arguments" if not settings.replan
                         else "would be made: --replan")
            plans = None
            art_plans = ctx.ledger.get_artifact(planning.PLANS)
            if art_plans and art_plans.details:
                path = layout.preprocessed / f"{art_plans.details['plans_identifier']}.json"
                if path.is_file():
                    plans = planning.load_plans(path)
                    out.notes.append("outputs below are judged against the current plans; new plans may change "
                                     "more configurations")
        if settings.steps == "plan":
            return out
        if plans is None:
            out.notes.append("no plans yet: every case would be preprocessed in every configuration the plans make")
            return out
        scope = outputs.configurations_in_scope(ctx, plans, dataset_json)  # type: ignore[arg-type]
        path = layout.preprocessed / f"{plans['plans_name']}.json" if settings.plans_name is None else path
        out.plan_changes = planning.changes_since_last_use(layout, path, plans,
                                                           [c.configuration for c in scope if c.configuration
                                                            != GT_IDENTIFIER])
        pplan = outputs.plan_outputs(ctx, cases, records, plans, scope)  # type: ignore[arg-type]
        names = {c.data_identifier: c.configuration for c in scope}
        grouped: dict[str, dict[str, list[str]]] = defaultdict(dict)
        for ow in pplan.work:
            for ident, reason in ow.reasons.items():
                grouped[names[ident]].setdefault(_category(reason), []).append(ow.case)
        out.outputs = dict(grouped)
        out.outputs_up_to_date = pplan.up_to_date
        out.blocked = pplan.blocked
        return out
    finally:
        if ledger:
            ledger.close()


def render(d: DryRun) -> str:
    def cases(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" ... (+{len(names) - 6})" if len(names) > 6 else "")

    lines = [f"{d.dataset}: {d.cases} case(s) — dry run, nothing is changed"]
    for p in d.problems:
        lines.append(f"  problem (the run would report it and exit 3): {p}")
    if d.removed:
        lines.append(f"  remove outputs of {len(d.removed)} case(s) no longer in the raw dataset: {cases(d.removed)}")
    total = sum(len(v) for v in d.fingerprint.values())
    lines.append(f"  fingerprint: {total} to analyse, {d.fingerprint_up_to_date} up to date")
    for reason, names in sorted(d.fingerprint.items()):
        lines.append(f"    {len(names)} {reason}: {cases(names)}")
    lines.append(f"  plans: {d.plans}")
    for change in d.plan_changes:
        lines.append(f"    plans changed: {change}")
    for conf, reasons in d.outputs.items():
        n = len({c for names in reasons.values() for c in names})
        lines.append(f"  {conf}: {n} case(s) to preprocess")
        for reason, names in sorted(reasons.items()):
            lines.append(f"    {len(names)} {reason}: {cases(names)}")
    if d.outputs or d.plans.startswith(("up to date", "given")):
        lines.append(f"  {d.outputs_up_to_date} case(s) up to date in every configuration")
    for case, why in list(d.blocked.items())[:10]:
        lines.append(f"  {case}: cannot be preprocessed: {why}")
    for note in d.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def dry_run(settings: PreprocessSettings, paths: Paths, name_or_id: str) -> str:
    return render(plan_dry_run(settings, paths, name_or_id))
