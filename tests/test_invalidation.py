"""What a rerun redoes: nothing after a `touch`; one case after its content changes; one configuration after it is
edited in the plans; a removed case's outputs disappear; an added case costs only itself where the other outputs do
not depend on the dataset's statistics. Final outputs are checked against nnU-Net's own.

A content change is undone as well as made: the change redoes one case, undoing it redoes that case again and gives
the dataset nnU-Net's reference was made from, so both directions are checked against nnU-Net without a reference of
the changed dataset.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import (
    EDITED_SPACING,
    SMALL,
    SMALL_FOLDERS,
    References,
    Workspace,
    last_run,
    ledger_query,
    redone,
    run_nnresume,
)
from .references import Lane, job, plan_and_preprocess

pytestmark = pytest.mark.slow

ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")


def _fingerprints_made(ledger: Path, run_id: int) -> set[str]:
    return {r[0] for r in ledger_query(ledger, "select c.name from fingerprints f join cases c on c.id=f.case_id "
                                               "where f.run_id=?", (run_id,))}


def _edit_image(path: Path, edit) -> None:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    edit(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path), useCompression=True)


@pytest.mark.references("small")
def test_touch_redoes_nothing_and_a_content_change_redoes_that_case_only(finished_small: Workspace, raw_root: Path,
                                                                         references: References) -> None:
    raw, pp, ledger = finished_small.raw, finished_small.pp, finished_small.ledger
    fingerprint = (finished_small.dataset / "dataset_fingerprint.json").read_bytes()
    case_dir = raw / SMALL.folder_name
    touched = case_dir / "imagesTr" / "small_0002_0000.nii.gz"
    before = touched.stat().st_mtime_ns
    os.utime(touched, ns=(before + 5_000_000_000, before + 5_000_000_000))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "labelsTr" / "small_0005.nii.gz")))

    def bump_background(arr: np.ndarray) -> None:
        # a body voxel outside the label, well inside the nonzero region: the crop and the foreground samples, and
        # so the dataset fingerprint, stay the same
        z, y, x = np.argwhere((label == 0) & (arr > -300) & (arr < -60))[0]
        arr[z, y, x] += 7

    changed = case_dir / "imagesTr" / "small_0005_0000.nii.gz"
    _edit_image(changed, bump_background)
    run_nnresume(raw, pp, *ARGS)
    run_id = last_run(ledger)
    assert _fingerprints_made(ledger, run_id) == {"small_0005"}, "a touch is hashed again, not fingerprinted"
    assert redone(ledger, run_id) == {("small_0005", f) for f in SMALL_FOLDERS}
    assert (finished_small.dataset / "dataset_fingerprint.json").read_bytes() == fingerprint
    (mtime,) = ledger_query(ledger, "select f.mtime_ns from input_files f join cases c on c.id=f.case_id "
                                    "where c.name='small_0002' and f.role='image'")[0]
    assert mtime == before + 5_000_000_000, "the ledger should now know the new mtime"

    # the change undone (the file as it was, its time included): that case again, and the dataset nnU-Net made
    # its reference from
    shutil.copy2(raw_root / SMALL.folder_name / "imagesTr" / changed.name, changed)
    run_nnresume(raw, pp, *ARGS)
    assert redone(ledger, last_run(ledger)) == {("small_0005", f) for f in SMALL_FOLDERS}
    assert compare_folders(finished_small.dataset, references.get("small"), SMALL_FOLDERS,
                           ["nnUNetPlans.json"]) == []


@pytest.mark.references("small-plans-edited")
def test_plans_edit_redoes_that_configuration_only(finished_small: Workspace, references: References) -> None:
    raw, pp, ledger = finished_small.raw, finished_small.pp, finished_small.ledger
    plans_file = finished_small.dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = EDITED_SPACING
    plans_file.write_text(json.dumps(plans, indent=4))
    run_nnresume(raw, pp, *ARGS)
    assert redone(ledger, last_run(ledger)) == {(f"small_{i:04d}", "nnUNetPlans_3d_fullres")
                                                for i in range(SMALL.num_cases)}
    assert json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"] == EDITED_SPACING
    # nnU-Net's own preprocessing (nnUNetv2_preprocess) with the same edit of its own plans gives the same data
    assert compare_folders(finished_small.dataset, references.get("small-plans-edited"),
                           ["nnUNetPlans_3d_fullres"]) == []


def _set_num_training(dataset: Path, n: int) -> None:
    dj = json.loads((dataset / "dataset.json").read_text())
    dj["numTraining"] = n
    (dataset / "dataset.json").write_text(json.dumps(dj, indent=4))


@pytest.mark.references("small")
def test_removed_case_loses_its_outputs(finished_small: Workspace, references: References) -> None:
    """SMALL with a ninth case, then without it: the ninth's outputs go, and the folder is nnU-Net's for SMALL."""
    raw, pp, ledger = finished_small.raw, finished_small.pp, finished_small.ledger
    ds = raw / SMALL.folder_name
    extra = [ds / "imagesTr" / "small_0008_0000.nii.gz", ds / "labelsTr" / "small_0008.nii.gz"]
    shutil.copy(ds / "imagesTr" / "small_0003_0000.nii.gz", extra[0])
    shutil.copy(ds / "labelsTr" / "small_0003.nii.gz", extra[1])
    _set_num_training(ds, SMALL.num_cases + 1)
    run_nnresume(raw, pp, *ARGS)
    assert ("small_0008", "nnUNetPlans_3d_fullres") in redone(ledger, last_run(ledger))

    for path in extra:
        path.unlink()
    _set_num_training(ds, SMALL.num_cases)
    run_nnresume(raw, pp, *ARGS)
    assert list(finished_small.dataset.rglob("small_0008*")) == []
    assert ledger_query(ledger, "select count(*) from cases where name='small_0008'")[0][0] == 0
    assert compare_folders(finished_small.dataset, references.get("small"), SMALL_FOLDERS,
                           ["nnUNetPlans.json"]) == []


ZSCORED = DemoSpec(dataset_id=931, name="ZScored", num_cases=5, channels=("T2", "ADC"), min_shape=(10, 24, 24),
                   max_shape=(10, 24, 24), seed=5)


def _zscored_raw(references: References, folder: Path, lane: Lane) -> Path:
    """ZSCORED with one shape and one spacing (so that the plans stay when a case is added), its last case a copy of
    the second, and nnU-Net's outputs for it; returns the folder holding both."""
    raw = folder / "raw"
    make_dataset(ZSCORED, raw)
    ds = raw / ZSCORED.folder_name
    for path in ds.glob("*Tr/*.nii.gz"):
        image = sitk.ReadImage(str(path))
        image.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(image, str(path), useCompression=True)
    for channel in ("0000", "0001"):
        shutil.copy(ds / "imagesTr" / f"zscored_0001_{channel}.nii.gz",
                    ds / "imagesTr" / f"zscored_0004_{channel}.nii.gz")
    shutil.copy(ds / "labelsTr" / "zscored_0001.nii.gz", ds / "labelsTr" / "zscored_0004.nii.gz")
    plan_and_preprocess(lane, raw, folder / "pp", [ZSCORED.dataset_id])
    return folder


job("zscored", _zscored_raw, cost=26)


@pytest.mark.references("zscored")
def test_added_case_keeps_the_outputs_of_z_scored_channels(references: References, tmp_path: Path) -> None:
    """Adding a case changes the dataset's foreground intensity statistics (nnU-Net samples every case anew), which
    only CT normalisation reads: with z-scored channels and unchanged configurations the other cases' outputs are
    kept, and the result is nnU-Net's on the grown dataset. Only the new case is analysed: the others' samples for
    the new count are made from their results (two channels, so that the second channel's are made from what was
    kept of it), and the dataset fingerprint is nnU-Net's."""
    made = references.get("zscored")
    raw, pp = tmp_path / "raw", tmp_path / "pp"
    shutil.copytree(made / "raw", raw)
    ds, out = raw / ZSCORED.folder_name, pp / ZSCORED.folder_name
    added = [ds / "imagesTr" / "zscored_0004_0000.nii.gz", ds / "imagesTr" / "zscored_0004_0001.nii.gz",
             ds / "labelsTr" / "zscored_0004.nii.gz"]
    for path in added:
        path.unlink()
    _set_num_training(ds, ZSCORED.num_cases - 1)
    args = ("preprocess", "-d", str(ZSCORED.dataset_id), "-np", "2", "--no-pbar")
    run_nnresume(raw, pp, *args)
    plans_before = json.loads((out / "nnUNetPlans.json").read_text())

    for path in added:
        shutil.copy2(made / "raw" / ZSCORED.folder_name / path.parent.name / path.name, path)
    _set_num_training(ds, ZSCORED.num_cases)
    run_nnresume(raw, pp, *args)
    plans_after = json.loads((out / "nnUNetPlans.json").read_text())
    assert plans_after["configurations"] == plans_before["configurations"]
    key = "foreground_intensity_properties_per_channel"
    assert plans_after[key] != plans_before[key], "the statistics were expected to change with the case count"
    ledger = out / "nnresume.sqlite"
    changed = redone(ledger, last_run(ledger))
    assert changed and {case for case, _ in changed} == {"zscored_0004"}
    analysed = ledger_query(ledger, "select case_name from attempts where stage='fingerprint' and run_id=?",
                            (last_run(ledger),))
    assert analysed == [("zscored_0004",)], analysed
    reference = made / "pp" / ZSCORED.folder_name
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert compare_folders(out, reference, folders, ["nnUNetPlans.json"]) == []
