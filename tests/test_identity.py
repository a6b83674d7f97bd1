"""nnresume's outputs equal nnU-Net's: both commands run on the same dataset with the same arguments into separate
folders; the fingerprint, the plans, dataset.json, every case's decompressed arrays and properties, and
gt_segmentations must be equal.

The other planners' and arguments' runs start, for both commands, from the dataset's own fingerprint (nnU-Net reuses
the dataset_fingerprint.json in the folder; nnresume reuses its ledger's fingerprints): what they add is planning and
preprocessing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nnresume.compare import compare_folders

from .conftest import LOWRES, LOWRES_ARGS, MULTI, SMALL, SMALL_FOLDERS, References, Workspace, run_nnresume

pytestmark = pytest.mark.slow


@pytest.mark.references("small")
def test_small_identical_to_nnunet(finished_small: Workspace, references: References) -> None:
    """Mixed spacings (isotropic and the separate-z path), one CT channel, 2d and 3d_fullres."""
    reference = references.get("small")
    assert sorted(p.name for p in reference.iterdir() if p.is_dir()) == sorted(SMALL_FOLDERS)
    assert compare_folders(finished_small.dataset, reference, SMALL_FOLDERS, ["nnUNetPlans.json"]) == []


@pytest.mark.parametrize("spec, args, key", [
    pytest.param(MULTI, (), "multi", id="multi-channel"),
    pytest.param(LOWRES, tuple(LOWRES_ARGS), "lowres", id="lowres-and-cascade"),
])
@pytest.mark.references("multi", "lowres")
def test_outputs_identical_to_nnunet(spec, args, key, raw_root: Path, references: References,
                                     tmp_path: Path) -> None:
    run_nnresume(raw_root, tmp_path / "pp", "preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar", *args)
    reference = references.get(key)
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert "gt_segmentations" in folders
    if spec is LOWRES:
        assert {"nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "nnUNetPlans_3d_lowres"} <= set(folders)
    assert compare_folders(tmp_path / "pp" / spec.folder_name, reference, folders, ["nnUNetPlans.json"]) == []


@pytest.mark.parametrize("args, key, plans", [
    pytest.param(("-pl", "nnUNetPlannerResEncM"), "small-resenc", "nnUNetResEncUNetMPlans.json",
                 id="resenc-m-planner"),
    pytest.param(("-overwrite_target_spacing", "2", "1.5", "1.5", "-overwrite_plans_name", "nnUNetPlansCoarse",
                  "-c", "3d_fullres"), "small-coarse", "nnUNetPlansCoarse.json", id="target-spacing-and-plans-name"),
])
@pytest.mark.references("small-resenc", "small-coarse")
def test_other_planning_arguments_identical_to_nnunet(args, key, plans, finished_small: Workspace,
                                                      references: References) -> None:
    run_nnresume(finished_small.raw, finished_small.pp, "preprocess", "-d", str(SMALL.dataset_id), "-np", "2",
                 "--no-pbar", *args)
    reference = references.get(key)
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert "gt_segmentations" in folders and len(folders) >= 2
    assert compare_folders(finished_small.dataset, reference, folders, [plans]) == []


@pytest.mark.references("small")
def test_comparison_detects_a_difference(references: References, tmp_path: Path) -> None:
    """The identity check above can fail: a changed array value is reported."""
    import blosc2
    import numpy as np

    reference = references.get("small")
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    target = copy / "nnUNetPlans_3d_fullres" / "small_0000.b2nd"
    arr = blosc2.open(str(target))[:]
    arr.flat[arr.size // 2] += 1.0
    target.unlink()
    blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(target))
    diffs = compare_folders(copy, reference, ["nnUNetPlans_3d_fullres"], ["nnUNetPlans.json"])
    assert diffs == ["nnUNetPlans_3d_fullres/small_0000.b2nd: array values differ"]
