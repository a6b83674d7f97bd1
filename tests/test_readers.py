"""Every reader and dataset.json layout nnU-Net accepts, against nnU-Net's own command: a differential matrix.

Each cell generates a tiny dataset (demo.py), runs `nnUNetv2_plan_and_preprocess` and `nnresume preprocess` with the
same arguments, and compares the fingerprint, the plans, dataset.json and every case's arrays and properties; then
`nnresume check` must find no error in it. The rejection cells break one case in a way nnU-Net's command fails on:
nnU-Net's run fails, nnresume fails that case alone with one line naming the case, the file and the cause.

Shapes are the smallest that still crop, resample and (for 3D) make a 2d and a 3d_fullres configuration.
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import env_for, nnunet_command, run_nnresume

pytestmark = pytest.mark.slow

S3 = dict(min_shape=(8, 20, 20), max_shape=(12, 28, 28))
S2 = dict(min_shape=(1, 24, 24), max_shape=(1, 40, 40))

CELLS: dict[str, DemoSpec] = {
    # SimpleITKIO, one ending per ITK format nnU-Net lists
    "nrrd": DemoSpec(dataset_id=801, name="Nrrd", num_cases=3, file_ending=".nrrd", **S3),
    "mha-2-channels": DemoSpec(dataset_id=802, name="Mha", num_cases=3, file_ending=".mha", channels=("CT", "T2"),
                               **S3),
    "gipl": DemoSpec(dataset_id=803, name="Gipl", num_cases=3, file_ending=".gipl", **S3),
    "nii.gz-2d": DemoSpec(dataset_id=804, name="Sitk2d", num_cases=3, ndim=2, **S2),
    "SimpleITKIOWithReorient": DemoSpec(dataset_id=805, name="SitkReorient", num_cases=3,
                                        reader="SimpleITKIOWithReorient", oblique=True, **S3),
    # NibabelIO: chosen for .nii by the registry; the reorienting one by overwrite_image_reader_writer
    "nii": DemoSpec(dataset_id=806, name="Nib", num_cases=3, file_ending=".nii", **S3),
    "NibabelIOWithReorient": DemoSpec(dataset_id=807, name="NibReorient", num_cases=3,
                                      reader="NibabelIOWithReorient", oblique=True, **S3),
    # NaturalImage2DIO: grey (one file per channel), RGB and RGBA (one file holding every channel), BMP, 2D TIFF
    "png-grey": DemoSpec(dataset_id=808, name="Png", num_cases=3, ndim=2, file_ending=".png", channels=("grey",),
                         **S2),
    "png-rgb": DemoSpec(dataset_id=809, name="Rgb", num_cases=3, ndim=2, file_ending=".png", colour=3, **S2),
    "png-rgba": DemoSpec(dataset_id=810, name="Rgba", num_cases=2, ndim=2, file_ending=".png", colour=4, **S2),
    "bmp-2-channels": DemoSpec(dataset_id=811, name="Bmp", num_cases=3, ndim=2, file_ending=".bmp",
                               channels=("a", "b"), **S2),
    "tif-2d": DemoSpec(dataset_id=812, name="Tif2d", num_cases=3, ndim=2, file_ending=".tif", channels=("grey",),
                       **S2),
    # Tiff3DIO, with the <case>.json spacing files
    "tif-3d": DemoSpec(dataset_id=813, name="Tif3d", num_cases=3, file_ending=".tif", **S3),
    "tiff-3d-2-channels": DemoSpec(dataset_id=814, name="Tiff3d", num_cases=3, file_ending=".tiff",
                                   channels=("a", "b"), **S3),
    # dataset.json variants
    "list-relative-regions": DemoSpec(dataset_id=815, name="ListRel", num_cases=3, layout="list",
                                      labels="regions", **S3),
    "list-absolute-ignore": DemoSpec(dataset_id=816, name="ListAbs", num_cases=3, layout="list",
                                     absolute_paths=True, labels="ignore", **S3),
}


def _run_nnunet(raw: Path, pp: Path, dataset_id: int) -> subprocess.CompletedProcess:
    pp.mkdir(parents=True, exist_ok=True)
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-npfp", "2", "-np", "2", "--no_pbar"]
    return subprocess.run(cmd, env=env_for(raw, pp), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("cell", list(CELLS))
def test_identical_to_nnunet(cell: str, tmp_path: Path) -> None:
    spec = CELLS[cell]
    raw = tmp_path / "raw"
    make_dataset(spec, raw)
    reference = _run_nnunet(raw, tmp_path / "ref", spec.dataset_id)
    assert reference.returncode == 0, f"nnU-Net failed on {cell}:\n{reference.stdout[-2000:]}{reference.stderr[-2000:]}"
    r = run_nnresume(raw, tmp_path / "ours", "preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar")
    assert "Traceback" not in r.stderr
    ref = tmp_path / "ref" / spec.folder_name
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    plans = sorted(p.name for p in ref.glob("nnUNetPlans*.json"))
    assert "gt_segmentations" in folders and any(f.endswith("_2d") for f in folders) and plans
    assert compare_folders(tmp_path / "ours" / spec.folder_name, ref, folders, plans) == []
    # nothing to warn about in these datasets, and the header checks count channels and axes as the reader does
    status = json.loads(run_nnresume(raw, tmp_path / "ours", "status", "-d", str(spec.dataset_id),
                                     "--json").stdout)
    assert status["warnings"] == [] and status["failures"] == [] and status["problems"] == []
    check = json.loads(run_nnresume(raw, tmp_path / "ours", "check", "-d", str(spec.dataset_id), "--json").stdout)
    assert check["datasets"][0]["findings"] == []


def _png_label_wrong_shape(ds: Path) -> tuple[str, str, str]:
    from PIL import Image

    label = ds / "labelsTr" / "png_0001.png"
    arr = np.asarray(Image.open(label))
    Image.fromarray(arr[:-3]).save(label)
    return "png_0001", "png_0001.png", "label shape"


def _rgb_case_in_grey(ds: Path) -> tuple[str, str, str]:
    from PIL import Image

    image = ds / "imagesTr" / "rgb_0002_0000.png"
    Image.open(image).convert("L").save(image)
    return "rgb_0002", "rgb_0002_0000.png", "1 image channel(s) in 1 file(s) (rgb_0002_0000.png: 1) but dataset.json " \
                                            "declares 3"


def _tif_label_2d(ds: Path) -> tuple[str, str, str]:
    import tifffile

    label = ds / "labelsTr" / "tif3d_0000.tif"
    tifffile.imwrite(label, tifffile.imread(label)[0])
    return "tif3d_0000", "tif3d_0000.tif", "cannot read label"


REJECTED: dict[str, tuple[str, Callable[[Path], tuple[str, str, str]]]] = {
    "png-label-of-another-shape": ("png-grey", _png_label_wrong_shape),
    "rgb-dataset-with-a-grey-case": ("png-rgb", _rgb_case_in_grey),
    "tif-3d-with-a-2d-label": ("tif-3d", _tif_label_2d),
}


@pytest.mark.parametrize("cell", list(REJECTED))
def test_what_nnunet_rejects_fails_that_case_alone(cell: str, tmp_path: Path) -> None:
    base, breakage = REJECTED[cell]
    spec = CELLS[base]
    raw = tmp_path / "raw"
    make_dataset(spec, raw)
    case, file, words = breakage(raw / spec.folder_name)
    reference = _run_nnunet(raw, tmp_path / "ref", spec.dataset_id)
    assert reference.returncode != 0, "nnU-Net accepted the broken dataset; the cell tests nothing"
    r = run_nnresume(raw, tmp_path / "ours", "preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar",
                     expect=3)
    assert "Traceback" not in r.stderr
    status = json.loads(run_nnresume(raw, tmp_path / "ours", "status", "-d", str(spec.dataset_id),
                                     "--json").stdout)
    (failure,) = status["failures"]
    assert failure["case"] == case and file in failure["reason"] and words in failure["reason"], failure
    assert failure["reason"].count("\n") == 0
    done = status["stages"][next(k for k in status["stages"] if k.endswith("_2d"))]["counts"]["done"]
    assert done == spec.num_cases - 1
