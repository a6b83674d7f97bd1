"""Stage 2: the plans, by nnU-Net's planner class, written atomically.

Planning runs when what it depends on changed: the dataset fingerprint, the planner and its arguments, nnunetv2's
version, dataset.json or splits_final.json (or with --replan). Otherwise the plans file is used as it is on disk,
so a configuration edited by hand in the plans JSON is honoured and only that configuration's outputs are redone (its
hash changes; see dataset.config_hash). When planning does run, nnU-Net's own rule applies: configurations the planner
makes are replaced, others already in the file are kept.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..dataset import DatasetLayout, key_of, resolve_configuration
from ..errors import DatasetError
from ..io import atomic
from ..tasks import PlanTask
from .context import RunContext, place_artifact

log = logging.getLogger(__name__)

PLANS = "plans"
DATASET_JSON = "dataset.json"


def _digest_or_none(path: Path) -> str | None:
    return atomic.file_digest(path) if path.is_file() else None


def plans_key(ctx: RunContext, fingerprint_sha: str) -> str:
    raw = ctx.layout.raw
    return key_of({"fingerprint": fingerprint_sha, "planner": ctx.settings.planner_arguments(),
                   "nnunetv2": ctx.nnunetv2_version, "dataset_json": _digest_or_none(raw / "dataset.json"),
                   "splits": _digest_or_none(raw / "splits_final.json")})


def load_plans(path: Path) -> dict[str, Any]:
    try:
        plans = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}",
                           "fix the file, or delete it and run again to plan anew (--replan)") from None
    if not isinstance(plans, dict) or "configurations" not in plans or "plans_name" not in plans:
        raise DatasetError(f"{path} is not an nnU-Net plans file (no 'configurations' or 'plans_name')")
    return plans


def up_to_date_plans(ctx: RunContext, fingerprint_sha: str) -> tuple[Path, dict[str, Any]] | None:
    """The plans on disk if planning need not run again, else None."""
    if ctx.settings.replan:
        return None
    art = ctx.ledger.get_artifact(PLANS)
    if art is None or art.key != plans_key(ctx, fingerprint_sha) or not art.details:
        return None
    path = ctx.layout.preprocessed / f"{art.details['plans_identifier']}.json"
    copied = ctx.layout.preprocessed / DATASET_JSON
    if not path.is_file() or _digest_or_none(copied) != _digest_or_none(ctx.layout.raw / DATASET_JSON):
        return None
    plans = load_plans(path)
    if atomic.file_digest(path) != art.sha256:
        log.info("%s was edited since it was planned; using it as it is", path.name)
    return path, plans


def copy_dataset_json(ctx: RunContext) -> None:
    """dataset.json beside the plans, as nnU-Net's planner copies it there (training and nnUNetv2_preprocess read that
    copy); written atomically, and only where it is missing or differs from the raw dataset's."""
    raw, copied = ctx.layout.raw / DATASET_JSON, ctx.layout.preprocessed / DATASET_JSON
    if _digest_or_none(copied) != _digest_or_none(raw):
        if copied.is_file():
            log.info("%s differs from %s; replaced by a copy of it", copied, raw)
        atomic.copy_file(raw, copied, ctx.staging)


def plan(ctx: RunContext, fingerprint_sha: str, reader_writer: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Runs the planner in a worker (the caller has checked `up_to_date_plans` first)."""
    s = ctx.settings
    log.info("Planning with %s", s.planner)
    result = ctx.run_one(PlanTask(f"plan-{ctx.run_id}", ctx.layout.name, s.planner, s.gpu_memory_target,
                                  s.preprocessor_name, s.overwrite_target_spacing, s.overwrite_plans_name,
                                  reader_writer, str(ctx.staging / "plan")))
    identifier = str(result.value)
    path = ctx.layout.preprocessed / f"{identifier}.json"
    place_artifact(result.staged, path, "plans_write")
    # the planner copies dataset.json with a plain copy; make sure a complete copy is what stays
    copy_dataset_json(ctx)
    ctx.ledger.set_artifact(PLANS, plans_key(ctx, fingerprint_sha), path.stat().st_size, atomic.file_digest(path),
                            ctx.run_id, {"plans_identifier": identifier, "planner": s.planner})
    log.info("Plans written to %s", path)
    return path, load_plans(path)


# plan-level fields the preprocessor reads (dataset.config_hash), besides each configuration's own
_PLAN_FIELDS = ("transpose_forward", "image_reader_writer", "label_manager",
                "foreground_intensity_properties_per_channel")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def changes(old: dict[str, Any], new: dict[str, Any], configurations: list[str]) -> list[str]:
    """What differs between two plans for the given configurations, one line per field: "3d_fullres spacing
    [1.0, 0.5, 0.5] -> [1.1, 0.5, 0.5]"."""
    lines = []
    for key in _PLAN_FIELDS:
        if old.get(key) != new.get(key):
            lines.append(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}")
    for name in configurations:
        if name not in new.get("configurations", {}):
            continue
        if name not in old.get("configurations", {}):
            lines.append(f"{name}: new configuration")
            continue
        a, b = resolve_configuration(old, name), resolve_configuration(new, name)
        lines += [f"{name} {key} {_short(a.get(key))} -> {_short(b.get(key))}"
                  for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return lines


def _in_use(layout: DatasetLayout, plans_path: Path) -> Path:
    return layout.work / "plans-in-use" / plans_path.name


def changes_since_last_use(layout: DatasetLayout, plans_path: Path, plans: dict[str, Any],
                           configurations: list[str]) -> list[str]:
    """How `plans` differ from the copy kept when outputs were last made from a plans file of that name."""
    try:
        old = json.loads(_in_use(layout, plans_path).read_text())
    except (OSError, ValueError):
        return []
    return changes(old, plans, configurations)


def use(ctx: RunContext, plans_path: Path, plans: dict[str, Any], configurations: list[str]) -> list[str]:
    """Says how the plans differ from those the outputs were last made from (so that a user sees why outputs are
    redone), and keeps a copy of these as the ones in use. Returns the differences."""
    found = changes_since_last_use(ctx.layout, plans_path, plans, configurations)
    for line in found:
        log.info("plans changed: %s", line)
    kept = _in_use(ctx.layout, plans_path)
    if not found and kept.is_file() and atomic.file_digest(kept) == atomic.file_digest(plans_path):
        return found
    kept.parent.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(plans_path, kept, ctx.staging)
    return found
