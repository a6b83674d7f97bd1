"""`nnresume check`: every problem reported, header checks by default, pixel and CRC checks with --full, agreement
across datasets, and the preprocessed folder against the plans and the ledger."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import LOWRES, MULTI, SMALL, Workspace, copy_dataset, run_nnresume
from .test_bad_inputs import _rewrite, _undeclared

pytestmark = pytest.mark.slow


def _check(raw: Path, pp: Path, *args: str, expect: int) -> dict:
    return json.loads(run_nnresume(raw, pp, "check", *args, "--json", expect=expect).stdout)


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


def test_clean_dataset_passes_and_several_datasets_are_compared(raw_root: Path, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ok = _check(raw_root, pp, "-d", str(SMALL.dataset_id), "--full", expect=0)
    assert ok["datasets"][0]["errors"] == 0
    both = _check(raw_root, pp, "-d", str(SMALL.dataset_id), str(MULTI.dataset_id), expect=3)
    (disagree,) = both["across_datasets"]
    assert disagree["level"] == "error" and "disagree in count" in disagree["message"]
    same = _check(raw_root, pp, "-d", str(SMALL.dataset_id), "-d", str(LOWRES.dataset_id), expect=0)
    assert same["across_datasets"][0]["level"] == "info"


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
