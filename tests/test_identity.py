"""nnresume's outputs equal nnU-Net's: both commands run on the same dataset with the same arguments into separate
folders; the fingerprint, the plans, dataset.json, every case's decompressed arrays and properties, and
gt_segmentations must be equal."""
from __future__ import annotations

from pathlib import Path

import pytest

from nnresume.compare import compare_folders

from .conftest import BIG, BIG_ARGS, MULTI, SMALL, References, run_nnresume

pytestmark = pytest.mark.slow


def _data_folders(reference: Path) -> list[str]:
    return sorted(p.name for p in reference.iterdir() if p.is_dir())


@pytest.mark.parametrize("spec, args, plans", [
    pytest.param(SMALL, (), "nnUNetPlans.json", id="small-mixed-spacings"),
    pytest.param(MULTI, (), "nnUNetPlans.json", id="multi-channel"),
    pytest.param(BIG, tuple(BIG_ARGS), "nnUNetPlans.json", id="lowres-and-cascade"),
    pytest.param(SMALL, ("-pl", "nnUNetPlannerResEncM"), "nnUNetResEncUNetMPlans.json", id="resenc-m-planner"),
    pytest.param(SMALL, ("-overwrite_target_spacing", "2", "1.5", "1.5", "-overwrite_plans_name", "nnUNetPlansCoarse",
                         "-c", "3d_fullres"), "nnUNetPlansCoarse.json", id="target-spacing-and-plans-name"),
])
def test_outputs_identical_to_nnunet(spec, args, plans, raw_root: Path, references: References,
                                     tmp_path: Path) -> None:
    reference = references.get(spec, args)
    run_nnresume(raw_root, tmp_path / "pp", "preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar", *args)
    ours = tmp_path / "pp" / spec.folder_name
    folders = _data_folders(reference)
    assert "gt_segmentations" in folders
    if spec is BIG:
        assert {"nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "nnUNetPlans_3d_lowres"} <= set(folders)
    assert compare_folders(ours, reference, folders, [plans]) == []


def test_comparison_detects_a_difference(raw_root: Path, references: References, tmp_path: Path) -> None:
    """The identity check above can fail: a changed array value is reported."""
    import shutil

    import blosc2
    import numpy as np

    reference = references.get(SMALL)
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    target = copy / "nnUNetPlans_3d_fullres" / "small_0000.b2nd"
    arr = blosc2.open(str(target))[:]
    arr.flat[arr.size // 2] += 1.0
    target.unlink()
    blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(target))
    diffs = compare_folders(copy, reference, ["nnUNetPlans_3d_fullres"], ["nnUNetPlans.json"])
    assert diffs == ["nnUNetPlans_3d_fullres/small_0000.b2nd: array values differ"]
