"""Bad input: each broken case gets one clear message naming the case, the file and the cause, is marked failed, and
the run goes on with the others (exit code 3). A broken dataset as a whole fails at once, without a traceback."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import MULTI, SMALL, References, copy_dataset, run_nnresume, shared_raw
from .references import Lane, job, plan_and_preprocess

pytestmark = pytest.mark.slow


def _rewrite(path: Path, edit: Callable[[np.ndarray], np.ndarray], spacing: tuple | None = None) -> None:
    img = sitk.ReadImage(str(path))
    arr = edit(sitk.GetArrayFromImage(img))
    out = sitk.GetImageFromArray(arr)
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    out.SetSpacing(spacing or img.GetSpacing())
    sitk.WriteImage(out, str(path), useCompression=True)


def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a[a.shape[0] // 2, a.shape[1] // 2, a.shape[2] // 2] = np.nan
    return a


def _with_inf(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    a[1, 1, 1] = np.inf
    return a


def _undeclared(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[a == 2] = 5
    return a


def _break_single_channel(ds: Path) -> dict[str, tuple[str, str]]:
    """Breaks one case per kind; returns case -> (file expected in the message, words expected in the message)."""
    im, lb = ds / "imagesTr", ds / "labelsTr"
    corrupt = im / "small_0000_0000.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    _rewrite(lb / "small_0001.nii.gz", lambda a: a[:, :-3, :])
    _rewrite(lb / "small_0002.nii.gz", lambda a: a, spacing=(0.5, 0.5, 4.0))
    (im / "small_0003_0000.nii.gz").write_bytes(b"")
    (lb / "small_0004.nii.gz").write_bytes(b"this is not an image")
    _rewrite(lb / "small_0005.nii.gz", _undeclared)
    (lb / "small_0006.nii.gz").write_bytes(b"")
    (lb / "small_0007.nii.gz").unlink()
    (lb / "small_0007.nii.gz").mkdir()
    return {
        "small_0000": ("small_0000_0000.nii.gz", "truncated"),
        "small_0001": ("small_0001.nii.gz", "label shape"),
        "small_0002": ("small_0002.nii.gz", "label spacing"),
        "small_0003": ("small_0003_0000.nii.gz", "empty"),
        "small_0004": ("small_0004.nii.gz", "corrupt"),
        "small_0005": ("small_0005.nii.gz", "not declared"),
        "small_0006": ("small_0006.nii.gz", "empty"),
        "small_0007": ("small_0007.nii.gz", "directory"),
    }


def test_each_bad_case_fails_alone_with_a_clear_message(raw_root: Path, tmp_path: Path) -> None:
    raw = copy_dataset(raw_root, SMALL, tmp_path / "raw")
    # a few good cases so the run has something to finish
    good = []
    for i in range(8, 11):
        for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
            src = raw / SMALL.folder_name / sub / f"small_{i - 8:04d}{suffix}.nii.gz"
            shutil.copy(src, raw / SMALL.folder_name / sub / f"small_{i:04d}{suffix}.nii.gz")
        good.append(f"small_{i:04d}")
    expected = _break_single_channel(raw / SMALL.folder_name)
    pp = tmp_path / "pp"
    r = run_nnresume(raw, pp, "preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar", expect=3)
    assert "Traceback" not in r.stderr
    status = json.loads(run_nnresume(raw, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    failures = {f["case"]: f for f in status["failures"] if f["stage"] == "fingerprint"}
    assert set(failures) == set(expected), failures
    for case, (file, words) in expected.items():
        reason = failures[case]["reason"]
        assert failures[case]["state"] == "failed"
        assert f"case {case}" in reason and file in reason and words.lower() in reason.lower(), reason
        assert reason.count("\n") == 0, "one line per problem"
        assert any(case in line and words.lower() in line.lower() for line in r.stderr.splitlines()), case
    for ident in ("nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"):
        assert status["stages"][ident]["counts"]["done"] == len(good)
        assert status["stages"][ident]["counts"]["failed"] == len(expected)


def test_nan_and_infinite_values(tmp_path: Path) -> None:
    """ITK's NIfTI reader turns NaN into 0 before nnU-Net sees it; in MetaImage files NaN arrives as NaN."""
    spec = DemoSpec(dataset_id=904, name="Mha", num_cases=4, file_ending=".mha", seed=4)
    raw = tmp_path / "raw"
    make_dataset(spec, raw)
    im = raw / spec.folder_name / "imagesTr"
    _rewrite(im / "mha_0001_0000.mha", _with_nan)
    _rewrite(im / "mha_0002_0000.mha", _with_inf)
    pp = tmp_path / "pp"
    r = run_nnresume(raw, pp, "preprocess", "-d", "904", "-np", "2", "--no-pbar", expect=3)
    assert "Traceback" not in r.stderr
    status = json.loads(run_nnresume(raw, pp, "status", "-d", "904", "--json").stdout)
    failures = {f["case"]: f["reason"] for f in status["failures"] if f["stage"] == "fingerprint"}
    assert set(failures) == {"mha_0001", "mha_0002"}
    assert "mha_0001_0000.mha" in failures["mha_0001"] and "NaN" in failures["mha_0001"]
    assert "mha_0002_0000.mha" in failures["mha_0002"] and "infinite" in failures["mha_0002"]


def test_channel_files_missing_or_extra(raw_root: Path, tmp_path: Path) -> None:
    raw = copy_dataset(raw_root, MULTI, tmp_path / "raw")
    im = raw / MULTI.folder_name / "imagesTr"
    (im / "multi_0001_0001.nii.gz").unlink()
    shutil.copy(im / "multi_0002_0000.nii.gz", im / "multi_0002_0002.nii.gz")
    pp = tmp_path / "pp"
    r = run_nnresume(raw, pp, "preprocess", "-d", str(MULTI.dataset_id), "-np", "2", "--no-pbar", expect=3)
    assert "Traceback" not in r.stderr
    status = json.loads(run_nnresume(raw, pp, "status", "-d", str(MULTI.dataset_id), "--json").stdout)
    failures = {f["case"]: f["reason"] for f in status["failures"] if f["stage"] == "fingerprint"}
    assert set(failures) == {"multi_0001", "multi_0002"}
    assert "missing multi_0001_0001.nii.gz" in failures["multi_0001"]
    assert "unexpected multi_0002_0002.nii.gz" in failures["multi_0002"]
    assert status["stages"]["nnUNetPlans_3d_fullres"]["counts"]["done"] == MULTI.num_cases - 2


@pytest.mark.parametrize("breakage, message", [
    ("no-dataset-json", "dataset.json is missing"),
    ("invalid-dataset-json", "is not valid JSON"),
    ("no-labels-key", "no 'labels'"),
    ("no-dataset", "no dataset with id 909"),
    ("no-cases", "no training cases"),
])
def test_a_broken_dataset_fails_at_once(breakage: str, message: str, raw_root: Path, tmp_path: Path) -> None:
    raw = copy_dataset(raw_root, SMALL, tmp_path / "raw")
    ds = raw / SMALL.folder_name
    dataset_id = SMALL.dataset_id
    if breakage == "no-dataset-json":
        (ds / "dataset.json").unlink()
    elif breakage == "invalid-dataset-json":
        (ds / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    elif breakage == "no-labels-key":
        dj = json.loads((ds / "dataset.json").read_text())
        del dj["labels"]
        (ds / "dataset.json").write_text(json.dumps(dj))
    elif breakage == "no-dataset":
        dataset_id = 909
    elif breakage == "no-cases":
        for p in (ds / "imagesTr").iterdir():
            p.unlink()
    r = run_nnresume(raw, tmp_path / "pp", "preprocess", "-d", str(dataset_id), "--no-pbar",
                     expect=2 if breakage == "no-dataset" else 1)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("nnresume:"), r.stderr


def _altered(references: References, folder: Path, lane: Lane) -> Path:
    """SMALL with a NaN in a float NIfTI, a label moved away from its image and a label of only background, and
    nnU-Net's outputs for it; returns the folder holding both."""
    raw = copy_dataset(shared_raw(references), SMALL, folder / "raw")
    ds = raw / SMALL.folder_name
    _rewrite(ds / "imagesTr" / "small_0001_0000.nii.gz", _with_nan)  # float32 NIfTI: ITK reads the NaN as 0
    label = ds / "labelsTr" / "small_0002.nii.gz"
    img = sitk.ReadImage(str(label))
    img.SetOrigin((5.0, -3.0, 2.0))
    sitk.WriteImage(img, str(label), useCompression=True)
    _rewrite(ds / "labelsTr" / "small_0003.nii.gz", lambda a: np.zeros_like(a))
    plan_and_preprocess(lane, raw, folder / "ref", [SMALL.dataset_id])
    return folder


job("altered", _altered, cost=26)


@pytest.mark.references("altered")
def test_what_nnunet_alters_silently_is_preprocessed_as_nnunet_does_and_warned(references: References,
                                                                                tmp_path: Path) -> None:
    """NaN read as 0, a label that does not lie where its image is, a label with only background: nnU-Net takes
    them without a word. nnresume gives the same outputs, records a warning for each, and fails them with --strict.
    Up to a minute: its time includes waiting for nnU-Net's run on the altered data (a reference job, started in
    the background lane), two preprocess runs (the warnings, then --strict), `status` and `check --full`."""
    from nnresume.compare import compare_folders

    made = references.get("altered")
    raw, pp, did = made / "raw", tmp_path / "pp", str(SMALL.dataset_id)
    r = run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar")
    reference = made / "ref" / SMALL.folder_name
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert compare_folders(pp / SMALL.folder_name, reference, folders, ["nnUNetPlans.json"]) == []
    summary = r.stderr[r.stderr.index("completed"):]
    expected = {"small_0001": ("non_finite_in_file", "1 NaN"), "small_0002": ("geometry", "label origin"),
                "small_0003": ("background_only", "only background")}
    for case, (_, words) in expected.items():
        assert any(case in line and words in line for line in summary.splitlines()), (case, summary)

    status = json.loads(run_nnresume(raw, pp, "status", "-d", did, "--json").stdout)
    warned = {w["case"]: w for w in status["warnings"]}
    assert set(warned) == set(expected)
    for case, (kind, words) in expected.items():
        assert warned[case]["kind"] == kind and words in warned[case]["message"] and case in warned[case]["message"]
    assert status["failures"] == []
    text = run_nnresume(raw, pp, "status", "-d", did).stdout
    assert "warnings (3;" in text and "small_0001_0000.nii.gz" in text

    check = json.loads(run_nnresume(raw, pp, "check", "-d", did, "--full", "--json").stdout)
    found = {f["case"]: f for f in check["datasets"][0]["findings"]}
    assert set(found) == set(expected) and all(f["level"] == "warning" for f in found.values())
    assert "1 NaN" in found["small_0001"]["message"]

    r = run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar", "--strict", expect=3)
    status = json.loads(run_nnresume(raw, pp, "status", "-d", did, "--json").stdout)
    failed = {f["case"]: f for f in status["failures"]}
    assert set(failed) == set(expected)
    assert all(f["stage"] == "fingerprint" and f["reason"].startswith("--strict:") for f in failed.values())
    assert status["stages"]["nnUNetPlans_3d_fullres"]["counts"]["done"] == SMALL.num_cases - 3


COLOUR = DemoSpec(dataset_id=921, name="ColourLabel", num_cases=6, min_shape=(1, 48, 48), max_shape=(1, 64, 64),
                  ndim=2, file_ending=".png", seed=4)
COLOURED = {"colourlabel_0001", "colourlabel_0004"}


def _colour_labels(references: References, folder: Path, lane: Lane) -> Path:
    """A grey PNG dataset whose labels of two cases are saved in RGB (the class numbers in each colour channel),
    and nnU-Net's outputs for it; returns the folder holding both."""
    from PIL import Image

    ds = make_dataset(COLOUR, folder / "raw")
    for name in COLOURED:
        path = ds / "labelsTr" / f"{name}.png"
        grey = np.asarray(Image.open(path))
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    plan_and_preprocess(lane, folder / "raw", folder / "ref", [COLOUR.dataset_id])
    return folder


job("colour-label", _colour_labels, cost=17)


@pytest.mark.references("colour-label")
def test_a_colour_label_is_preprocessed_as_nnunet_does_and_warned(references: References, tmp_path: Path) -> None:
    """A label PNG saved in RGB: nnU-Net's reader returns three values per pixel and nnU-Net writes a three-channel
    segmentation without a word, which its training later refuses (its cross-entropy asserts one channel). nnresume
    writes the same files and warns for exactly those cases."""
    import blosc2

    from nnresume.compare import compare_folders

    spec, coloured, made = COLOUR, COLOURED, references.get("colour-label")
    pp = tmp_path / "pp"
    r = run_nnresume(made / "raw", pp, "preprocess", "-d", str(spec.dataset_id), "-np", "2", "--no-pbar")
    reference = made / "ref" / spec.folder_name
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert compare_folders(pp / spec.folder_name, reference, folders, ["nnUNetPlans.json"]) == []
    seg = blosc2.open(str(pp / spec.folder_name / "nnUNetPlans_2d" / "colourlabel_0001_seg.b2nd"))
    assert seg.shape[0] == 3  # what nnU-Net wrote too (compared above): the colour channels kept

    status = json.loads(run_nnresume(made / "raw", pp, "status", "-d", str(spec.dataset_id), "--json").stdout)
    warned = {w["case"]: w for w in status["warnings"]}
    assert set(warned) == coloured, r.stderr
    assert all(w["kind"] == "label_channels" and "3 values per pixel" in w["message"] for w in warned.values())
    # from the header alone, and with every case read (once each: the header's warning does not keep a case from
    # being read, and is not repeated)
    for full in ([], ["--full"]):
        check = json.loads(run_nnresume(made / "raw", pp, "check", "-d", str(spec.dataset_id), *full,
                                        "--json").stdout)
        found = check["datasets"][0]["findings"]
        assert sorted(f["case"] for f in found) == sorted(coloured), (full, found)
        assert all(f["level"] == "warning" and "3 values per pixel" in f["message"] for f in found), found
