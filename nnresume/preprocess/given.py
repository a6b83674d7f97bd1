"""Plans given with `-plans_name P`: `nnUNet_preprocessed/<dataset>/P.json` used as it is, as `nnUNetv2_preprocess
-plans_name P` uses it, and never written.

The documented ways such a file comes to be: the dataset's own plans under another name (`-overwrite_plans_name`),
plans moved from another dataset (`nnUNetv2_move_plans_between_datasets`, for fine-tuning), or a plans file edited by
hand. Everything that can be said of the file without nnunetv2 is checked here, before a run starts and before
anything is written: that it exists (else the plans files that do), that it is JSON and a plans file, that its
configurations normalise as many channels as the dataset has, and that every configuration asked for with -c is in
it. The preprocessor classes the configurations name are checked in a worker at the start of the run (pipeline.py).
Labels are not compared: nnU-Net's plans do not carry them (the preprocessor takes them from dataset.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import close_matches
from ..dataset import DatasetLayout, num_channels, resolve_configuration
from ..errors import DatasetError, UsageError


def plans_files(folder: Path) -> list[str]:
    """The plans identifiers in a preprocessed folder: its JSON files with configurations."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "configurations" in content:
            found.append(path.stem)
    return found


def load(layout: DatasetLayout, plans_name: str, dataset_json: dict[str, Any],
         configurations: tuple[str, ...], explicit: bool) -> tuple[Path, dict[str, Any]]:
    """The given plans, checked against the dataset and the configurations asked for; a UsageError says what is
    wrong with them and what to do."""
    path = layout.preprocessed / f"{plans_name}.json"
    if not path.is_file():
        have = plans_files(layout.preprocessed)
        raise UsageError(f"-plans_name {plans_name}: {path} does not exist"
                         + (f" (plans in that folder: {', '.join(have)})" if have else
                            f" and {layout.preprocessed} holds no plans"),
                         close_matches(plans_name, have) if have else
                         "plan first (`nnresume plan-experiment`), or move plans from another dataset with "
                         "nnUNetv2_move_plans_between_datasets")
    try:
        plans = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"-plans_name {plans_name}: {path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                         f"{e.colno}", "fix the file; nnresume never writes plans given with -plans_name") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"-plans_name {plans_name}: cannot read {path}: {e}") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise UsageError(f"-plans_name {plans_name}: {path} is not an nnU-Net plans file (no 'configurations')")
    _check_channels(path, plans, dataset_json, layout.name)
    available = list(plans["configurations"])
    if explicit:
        for name in configurations:
            if name not in available:
                raise UsageError(f"-c {name}: plans {path.name} have no configuration {name!r} (they have "
                                 f"{', '.join(available)})", close_matches(name, available))
    return path, plans


def _check_channels(path: Path, plans: dict[str, Any], dataset_json: dict[str, Any], dataset: str) -> None:
    """Plans normalise each channel by its own scheme: made for other channels (another dataset's modalities), they
    cannot preprocess this one. nnU-Net would fail on the first case, or worse, go on with the wrong schemes."""
    names = list(dataset_json.get("channel_names", dataset_json.get("modality", {})).values())
    have = num_channels(dataset_json)
    statistics = plans.get("foreground_intensity_properties_per_channel")
    if isinstance(statistics, dict) and statistics and len(statistics) != have:
        raise UsageError(f"{path.name} was made for {len(statistics)} channel(s) but {dataset} has {have} "
                         f"({', '.join(map(str, names))})",
                         "use plans made for a dataset with the same channels in the same order")
    for name in plans["configurations"]:
        try:
            schemes = resolve_configuration(plans, name).get("normalization_schemes")
        except (KeyError, DatasetError) as e:
            raise UsageError(f"{path.name}: configuration {name!r} cannot be resolved: {e}") from None
        if isinstance(schemes, list) and len(schemes) != have:
            raise UsageError(f"{path.name}: configuration {name} normalises {len(schemes)} channel(s) "
                             f"({', '.join(map(str, schemes))}) but {dataset} has {have} "
                             f"({', '.join(map(str, names))})",
                             "use plans made for a dataset with the same channels in the same order")


def preprocessor_names(plans: dict[str, Any], configurations: list[str]) -> set[str]:
    """The preprocessor classes the given configurations name (nnU-Net's default when they name none)."""
    return {str(resolve_configuration(plans, c).get("preprocessor_name", "DefaultPreprocessor"))
            for c in configurations}
