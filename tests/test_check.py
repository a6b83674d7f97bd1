"""`nnresume check`: every problem reported, header checks by default, pixel and CRC checks with --full, agreement
across datasets, and the preprocessed folder against the plans and the ledger."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import LOWRES, MULTI, SMALL, Workspace, copy_dataset, run_nnresume
from .test_bad_inputs import _rewrite, _undeclared


def _check(raw: Path, pp: Path, *args: str, expect: int) -> dict:
    return json.loads(run_nnresume(raw, pp, "check", *args, "--json", expect=expect).stdout)


@pytest.mark.slow
def test_header_and_full_checks_report_every_problem(raw_root: Path, tmp_path: Path) -> None:
    raw = copy_dataset(raw_root, SMALL, tmp_path / "raw")
    ds = raw / SMALL.folder_name
    im, lb = ds / "imagesTr", ds / "labelsTr"
    # two problems in one case, plus one per kind elsewhere
    _rewrite(lb / "small_0001.nii.gz", lambda a: a[:, :-3, :], spacing=(0.4, 0.4, 5.0))
    (im / "small_0002_0000.nii.gz").write_bytes((im / "small_0002_0000.nii.gz").read_bytes()[:5000])
    _rewrite(lb / "small_0003.nii.gz", _undeclared)  # only visible in the pixels
    flipped = bytearray((im / "small_0004_0000.nii.gz").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # only visible to a CRC check
    (im / "small_0004_0000.nii.gz").write_bytes(bytes(flipped))
    (lb / "small_0005.nii.gz").write_bytes(b"")
    pp = tmp_path / "pp"

    quick = _check(raw, pp, "-d", str(SMALL.dataset_id), expect=3)["datasets"][0]
    by_case: dict[str, list[str]] = {}
    for f in quick["findings"]:
        by_case.setdefault(f["case"], []).append(f["message"])
    # the bit flip may or may not break the header; undeclared label values need the pixels
    assert {"small_0001", "small_0002", "small_0005"} <= set(by_case) <= {"small_0001", "small_0002", "small_0004",
                                                                          "small_0005"}
    assert any("label shape" in m for m in by_case["small_0001"])
    assert any("label spacing" in m for m in by_case["small_0001"])
    assert "truncated" in by_case["small_0002"][0] and "empty" in by_case["small_0005"][0]

    full = _check(raw, pp, "-d", str(SMALL.dataset_id), "--full", expect=3)["datasets"][0]
    cases = {f["case"] for f in full["findings"] if f["level"] == "error"}
    assert cases == {"small_0001", "small_0002", "small_0003", "small_0004", "small_0005"}
    messages = " ".join(f["message"] for f in full["findings"])
    assert "not declared" in messages and "corrupt compressed data" in messages


@pytest.mark.slow
def test_clean_dataset_passes_and_several_datasets_are_compared(raw_root: Path, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ok = _check(raw_root, pp, "-d", str(SMALL.dataset_id), "--full", expect=0)
    assert ok["datasets"][0]["errors"] == 0
    both = _check(raw_root, pp, "-d", str(SMALL.dataset_id), str(MULTI.dataset_id), expect=3)
    (disagree,) = both["across_datasets"]
    assert disagree["level"] == "error" and "disagree in count" in disagree["message"]
    same = _check(raw_root, pp, "-d", str(SMALL.dataset_id), "-d", str(LOWRES.dataset_id), expect=0)
    assert same["across_datasets"][0]["level"] == "info"


@pytest.mark.slow
def test_preprocessed_dataset_against_plans_and_ledger(finished_small: Workspace) -> None:
    raw, pp, dataset = finished_small.raw, finished_small.pp, finished_small.dataset
    plans = json.loads((dataset / "nnUNetPlans.json").read_text())
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
    (dataset / "nnUNetPlans.json").write_text(json.dumps(plans))
    (dataset / "nnUNetPlans_2d" / "small_0002.b2nd").unlink()
    result = _check(raw, pp, "-d", str(SMALL.dataset_id), expect=3)["datasets"][0]
    messages = [f["message"] for f in result["findings"]]
    assert any("2 normalization_schemes for 1 channel" in m for m in messages)
    assert any("small_0002" in m and "missing" in m for m in messages)


def test_header_checks_in_this_process(tmp_path: Path) -> None:
    """The header mode without a CLI or a pool: a case with a label of another shape and a case with a channel file
    cut short are reported, each naming its case and file, and the dataset's channels are recorded."""
    from nnresume.commands.check import check_dataset, render
    from nnresume.dataset import layout_for
    from nnresume.synthetic import DemoSpec, make_dataset

    spec = DemoSpec(dataset_id=990, name="Headers", num_cases=3, channels=("CT", "T2"), min_shape=(4, 8, 8),
                    max_shape=(4, 8, 8), seed=3)
    ds = make_dataset(spec, tmp_path / "raw")
    _rewrite(ds / "labelsTr" / "headers_0001.nii.gz", lambda a: a[:, :-2, :])
    cut = ds / "imagesTr" / "headers_0002_0001.nii.gz"
    cut.write_bytes(cut.read_bytes()[:60])
    result = check_dataset(layout_for(str(spec.dataset_id), str(tmp_path / "raw"), str(tmp_path / "pp")),
                           full=False, workers=1, progress=False)
    assert result.cases == 3 and result.channels == {"0": "CT", "1": "T2"}
    errors = {f.case: f.message for f in result.findings if f.level == "error"}
    assert set(errors) == {"headers_0001", "headers_0002"}, render([result], [])
    assert "label" in errors["headers_0001"] and "headers_0001.nii.gz" in errors["headers_0001"]
    assert "headers_0002_0001.nii.gz" in errors["headers_0002"]
