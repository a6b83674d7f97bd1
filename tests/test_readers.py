"""Every reader and dataset.json layout nnU-Net accepts, against nnU-Net's own command: a differential matrix.

Each cell generates a tiny dataset (demo.py), runs `nnUNetv2_plan_and_preprocess` and `nnresume preprocess` with the
same arguments, and compares the fingerprint, the plans, dataset.json and every case's arrays and properties; then
`nnresume check` must find no error in it. The rejection cells break one case in a way nnU-Net's command fails on:
nnU-Net's run fails, nnresume fails that case alone with one line naming the case, the file and the cause.

Shapes are the smallest that still crop, resample and (for 3D) make a 2d and a 3d_fullres configuration.

Each command's run over the datasets is shared by the cells: nnU-Net's in two batches in the reference lane
(tests/references.py), nnresume's in one run over all of them, which imports nnunetv2 once; each cell then compares
its own dataset. (A dataset per reader is the least there can be: nnU-Net takes one reader per dataset, and its
fingerprint costs 10e7 intensity samples per channel whatever the size of the cases.)
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import References, Result, run_nnresume
from .references import Lane, job, plan_and_preprocess

pytestmark = pytest.mark.slow

S3 = dict(min_shape=(8, 20, 20), max_shape=(12, 28, 28))
S2 = dict(min_shape=(1, 24, 24), max_shape=(1, 40, 40))

CELLS: dict[str, DemoSpec] = {
    # SimpleITKIO, one ending per ITK format nnU-Net lists
    "nrrd": DemoSpec(dataset_id=801, name="Nrrd", num_cases=3, file_ending=".nrrd", **S3),
    "mha-2-channels": DemoSpec(dataset_id=802, name="Mha", num_cases=3, file_ending=".mha", channels=("CT", "T2"),
                               **S3),
    # with dataset.json's file list (relative) and region-based labels
    "gipl-list-relative-regions": DemoSpec(dataset_id=803, name="Gipl", num_cases=3, file_ending=".gipl",
                                           layout="list", labels="regions", **S3),
    "nii.gz-2d": DemoSpec(dataset_id=804, name="Sitk2d", num_cases=3, ndim=2, **S2),
    "SimpleITKIOWithReorient": DemoSpec(dataset_id=805, name="SitkReorient", num_cases=3,
                                        reader="SimpleITKIOWithReorient", oblique=True, **S3),
    # NibabelIO: chosen for .nii by the registry (here with dataset.json's file list, absolute, and an ignore label);
    # the reorienting one by overwrite_image_reader_writer
    "nii-list-absolute-ignore": DemoSpec(dataset_id=806, name="Nib", num_cases=3, file_ending=".nii", layout="list",
                                         absolute_paths=True, labels="ignore", **S3),
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
}


def _readers_raw(references: References, folder: Path, lane: Lane) -> Path:
    for spec in CELLS.values():
        make_dataset(spec, folder)
    return folder


# nnU-Net's runs in two batches of about equal cost (intensity samples per channel), so that two lanes can share them
BATCHES = {"readers-a": ["nrrd", "mha-2-channels", "gipl-list-relative-regions", "nii.gz-2d",
                         "SimpleITKIOWithReorient", "nii-list-absolute-ignore", "NibabelIOWithReorient", "png-rgba"],
           "readers-b": ["png-grey", "png-rgb", "bmp-2-channels", "tif-2d", "tif-3d", "tiff-3d-2-channels"]}
assert sorted(c for cells in BATCHES.values() for c in cells) == sorted(CELLS)


def _nnunet_batch(cells: list[str]) -> Callable[[References, Path, Lane], Path]:
    def make(references: References, folder: Path, lane: Lane) -> Path:
        plan_and_preprocess(lane, references.get("readers-raw"), folder, [CELLS[c].dataset_id for c in cells])
        return folder
    return make


job("readers-raw", _readers_raw, cost=1)
for _key, _cells in BATCHES.items():
    job(_key, _nnunet_batch(_cells), requires=("readers-raw",), cost=180)
REFERENCE_OF = {cell: key for key, cells in BATCHES.items() for cell in cells}


@dataclass
class Ours:
    pp: Path
    run: Result
    status: dict[str, dict]  # dataset folder name -> `status --json`
    check: dict[str, dict]  # dataset folder name -> its part of `check --json`


@pytest.fixture(scope="module")
def ours(references: References, tmp_path_factory: pytest.TempPathFactory) -> Ours:
    """nnresume over every accepted cell's dataset in one run, then `status` and `check` of all of them: one run
    (about a minute, 14 small datasets) instead of one per cell, which cost a start-up and a pool each."""
    raw = references.get("readers-raw")
    pp = tmp_path_factory.mktemp("readers-ours")
    ids = [str(spec.dataset_id) for spec in CELLS.values()]
    run = run_nnresume(raw, pp, "preprocess", "-d", *ids, "-np", "2", "--no-pbar")
    status = json.loads(run_nnresume(raw, pp, "status", "-d", *ids, "--json").stdout)
    # the datasets disagree with each other in channels and labels, which check reports across them (exit 3)
    check = json.loads(run_nnresume(raw, pp, "check", "-d", *ids, "--json", expect=None).stdout)
    return Ours(pp, run, {s["dataset"]: s for s in status}, {d["dataset"]: d for d in check["datasets"]})


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.references(*BATCHES)
def test_identical_to_nnunet(cell: str, ours: Ours, references: References) -> None:
    """Each accepted reader and layout gives nnU-Net's outputs. The first cell takes one to two minutes: its set-up is
    the `ours` fixture's one run over all cells and the wait for nnU-Net's two batched references; the others only
    compare."""
    spec = CELLS[cell]
    assert "Traceback" not in ours.run.stderr
    ref = references.get(REFERENCE_OF[cell]) / spec.folder_name
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    plans = sorted(p.name for p in ref.glob("nnUNetPlans*.json"))
    assert "gt_segmentations" in folders and any(f.endswith("_2d") for f in folders) and plans
    assert compare_folders(ours.pp / spec.folder_name, ref, folders, plans) == []
    # nothing to warn about in these datasets, and the header checks count channels and axes as the reader does
    status = ours.status[spec.folder_name]
    assert status["warnings"] == [] and status["failures"] == [] and status["problems"] == []
    assert ours.check[spec.folder_name]["findings"] == []


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


def _rejected(cell: str) -> Callable[[References, Path, Lane], tuple[Path, tuple[str, str, str], str]]:
    """The cell's base dataset with one case broken, and nnU-Net's command run on it: (raw folder, the case, file
    and words the message must have, nnU-Net's output) — the command must fail."""
    def make(references: References, folder: Path, lane: Lane) -> tuple[Path, tuple[str, str, str], str]:
        base, breakage = REJECTED[cell]
        spec = CELLS[base]
        make_dataset(spec, folder / "raw")
        expected = breakage(folder / "raw" / spec.folder_name)
        r = plan_and_preprocess(lane, folder / "raw", folder / "ref", [spec.dataset_id], check=False)
        assert r.returncode != 0, "nnU-Net accepted the broken dataset; the cell tests nothing"
        return folder / "raw", expected, r.stdout + r.stderr
    return make


for _cell in REJECTED:
    job(f"reject-{_cell}", _rejected(_cell), cost=12)


@pytest.mark.parametrize("cell", list(REJECTED))
@pytest.mark.references(*(f"reject-{c}" for c in REJECTED))
def test_what_nnunet_rejects_fails_that_case_alone(cell: str, references: References, tmp_path: Path) -> None:
    raw, (case, file, words), _ = references.get(f"reject-{cell}")
    spec = CELLS[REJECTED[cell][0]]
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
