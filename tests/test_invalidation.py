"""What a rerun redoes: nothing after a `touch`; one case after its content changes; one configuration after it is
edited in the plans; and a removed case's outputs disappear. Final outputs are checked against nnU-Net's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnresume.compare import compare_folders

from .conftest import SMALL, copy_dataset, env_for, ledger_query, nnunet_command, run_nnresume, run_nnunet

pytestmark = pytest.mark.slow

ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")
FOLDERS = ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"]


@pytest.fixture
def setup(raw_root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    raw = copy_dataset(raw_root, SMALL, tmp_path / "raw")
    pp = tmp_path / "pp"
    run_nnresume(raw, pp, *ARGS)
    return raw, pp, pp / SMALL.folder_name / "nnresume.sqlite"


def _last_run(ledger: Path) -> int:
    return ledger_query(ledger, "select max(id) from runs")[0][0]


def _redone(ledger: Path, run_id: int) -> set[tuple[str, str]]:
    """(case, data folder) pairs the given run committed."""
    return set(ledger_query(ledger, "select c.name, o.data_identifier from outputs o join cases c on c.id=o.case_id "
                                    "where o.run_id=?", (run_id,)))


def _fingerprints_made(ledger: Path, run_id: int) -> set[str]:
    return {r[0] for r in ledger_query(ledger, "select c.name from fingerprints f join cases c on c.id=f.case_id "
                                               "where f.run_id=?", (run_id,))}


def test_touch_redoes_nothing(setup) -> None:
    raw, pp, ledger = setup
    image = raw / SMALL.folder_name / "imagesTr" / "small_0002_0000.nii.gz"
    before = image.stat().st_mtime_ns
    os.utime(image, ns=(before + 5_000_000_000, before + 5_000_000_000))
    run_nnresume(raw, pp, *ARGS)
    run_id = _last_run(ledger)
    assert _redone(ledger, run_id) == set()
    assert _fingerprints_made(ledger, run_id) == set()
    (mtime,) = ledger_query(ledger, "select f.mtime_ns from input_files f join cases c on c.id=f.case_id "
                                    "where c.name='small_0002' and f.role='image'")[0]
    assert mtime == before + 5_000_000_000, "the ledger should now know the new mtime"


def _edit_image(path: Path, edit) -> None:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    edit(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path), useCompression=True)


def test_content_change_redoes_that_case_only(setup) -> None:
    raw, pp, ledger = setup
    fingerprint = (pp / SMALL.folder_name / "dataset_fingerprint.json").read_bytes()
    case_dir = raw / SMALL.folder_name
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "labelsTr" / "small_0005.nii.gz")))

    def bump_background(arr: np.ndarray) -> None:
        # a body voxel outside the label, well inside the nonzero region: the crop and the foreground samples, and
        # so the dataset fingerprint, stay the same
        z, y, x = np.argwhere((label == 0) & (arr > -300) & (arr < -60))[0]
        arr[z, y, x] += 7

    _edit_image(case_dir / "imagesTr" / "small_0005_0000.nii.gz", bump_background)
    run_nnresume(raw, pp, *ARGS)
    run_id = _last_run(ledger)
    assert (pp / SMALL.folder_name / "dataset_fingerprint.json").read_bytes() == fingerprint
    assert _fingerprints_made(ledger, run_id) == {"small_0005"}
    assert _redone(ledger, run_id) == {("small_0005", f) for f in FOLDERS}

    reference = pp.parent / "ref"
    run_nnunet(raw, reference, SMALL.dataset_id, [])
    assert compare_folders(pp / SMALL.folder_name, reference / SMALL.folder_name, FOLDERS,
                           ["nnUNetPlans.json"]) == []


def test_plans_edit_redoes_that_configuration_only(setup) -> None:
    raw, pp, ledger = setup
    plans_file = pp / SMALL.folder_name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [2.5, 0.9, 0.9]
    plans_file.write_text(json.dumps(plans, indent=4))
    run_nnresume(raw, pp, *ARGS)
    run_id = _last_run(ledger)
    assert _redone(ledger, run_id) == {(f"small_{i:04d}", "nnUNetPlans_3d_fullres") for i in range(SMALL.num_cases)}
    assert json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"] == [2.5, 0.9, 0.9]

    # nnU-Net's own preprocessing with the same edited plans gives the same 3d_fullres data
    other = pp.parent / "nnunet-pp"
    shutil.copytree(pp, other, ignore=shutil.ignore_patterns(".nnresume", "nnresume.sqlite*"))
    r = subprocess.run([nnunet_command("nnUNetv2_preprocess"), "-d", str(SMALL.dataset_id), "-c", "3d_fullres",
                        "-np", "2", "--no_pbar"], env=env_for(raw, other), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert compare_folders(pp / SMALL.folder_name, other / SMALL.folder_name, ["nnUNetPlans_3d_fullres"]) == []


def test_removed_case_loses_its_outputs(setup) -> None:
    raw, pp, ledger = setup
    ds = raw / SMALL.folder_name
    (ds / "imagesTr" / "small_0003_0000.nii.gz").unlink()
    (ds / "labelsTr" / "small_0003.nii.gz").unlink()
    dj = json.loads((ds / "dataset.json").read_text())
    dj["numTraining"] = SMALL.num_cases - 1
    (ds / "dataset.json").write_text(json.dumps(dj, indent=4))
    run_nnresume(raw, pp, *ARGS)

    leftovers = [p for p in (pp / SMALL.folder_name).rglob("small_0003*")]
    assert leftovers == []
    assert ledger_query(ledger, "select count(*) from cases where name='small_0003'")[0][0] == 0
    reference = pp.parent / "ref"
    run_nnunet(raw, reference, SMALL.dataset_id, [])
    assert compare_folders(pp / SMALL.folder_name, reference / SMALL.folder_name, FOLDERS,
                           ["nnUNetPlans.json"]) == []


def test_added_case_keeps_the_outputs_of_z_scored_channels(tmp_path: Path) -> None:
    """Adding a case changes the dataset's foreground intensity statistics (nnU-Net samples every case anew), which
    only CT normalisation reads: with z-scored channels and unchanged configurations the other cases' outputs are
    kept, and the result is nnU-Net's on the grown dataset."""
    from nnresume.synthetic import DemoSpec, make_dataset

    spec = DemoSpec(dataset_id=931, name="ZScored", num_cases=4, channels=("T2",), min_shape=(10, 24, 24),
                    max_shape=(10, 24, 24), seed=5)
    raw, pp = tmp_path / "raw", tmp_path / "pp"
    make_dataset(spec, raw)
    for path in (raw / spec.folder_name).glob("*Tr/*.nii.gz"):  # one shape and one spacing: the plans stay
        image = sitk.ReadImage(str(path))
        image.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(image, str(path), useCompression=True)
    args = ("preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar")
    run_nnresume(raw, pp, *args)
    ds, out = raw / spec.folder_name, pp / spec.folder_name
    plans_before = json.loads((out / "nnUNetPlans.json").read_text())
    shutil.copy(ds / "imagesTr" / "zscored_0001_0000.nii.gz", ds / "imagesTr" / "zscored_0004_0000.nii.gz")
    shutil.copy(ds / "labelsTr" / "zscored_0001.nii.gz", ds / "labelsTr" / "zscored_0004.nii.gz")
    dj = json.loads((ds / "dataset.json").read_text())
    dj["numTraining"] = spec.num_cases + 1
    (ds / "dataset.json").write_text(json.dumps(dj, indent=4))
    run_nnresume(raw, pp, *args)

    plans_after = json.loads((out / "nnUNetPlans.json").read_text())
    assert plans_after["configurations"] == plans_before["configurations"]
    key = "foreground_intensity_properties_per_channel"
    assert plans_after[key] != plans_before[key], "the statistics were expected to change with the case count"
    ledger = out / "nnresume.sqlite"
    redone = _redone(ledger, _last_run(ledger))
    assert redone and {case for case, _ in redone} == {"zscored_0004"}
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith(("nnUNetPlans", "gt_")))
    reference = tmp_path / "ref"
    run_nnunet(raw, reference, spec.dataset_id, [])
    assert compare_folders(out, reference / spec.folder_name, folders, ["nnUNetPlans.json"]) == []
