"""What a new user meets in the first hour, tried as they would: each message names what is wrong and what to do, and
the exit code matches the README's table (0 ok, 1 error, 2 usage, 3 some cases failed)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import SMALL, Workspace, env_for, ledger_query, nnresume_cmd, run_nnresume

TINY = DemoSpec(dataset_id=931, name="Tiny", num_cases=4, min_shape=(8, 20, 20), max_shape=(10, 24, 24), seed=31)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    make_dataset(TINY, raw)
    return raw, tmp_path / "pp"


@pytest.mark.parametrize("value, words", [
    ("1.5", "ambiguous"), ("2400", "ambiguous"), ("1", "ambiguous"), ("1K", "less than"), ("100M", "less than"),
])
def test_absurd_budgets_are_usage_errors(tiny: tuple[Path, Path], value: str, words: str) -> None:
    raw, pp = tiny
    r = run_nnresume(raw, pp, "preprocess", "-d", str(TINY.dataset_id), "--max-ram", value, "--no-pbar", expect=2)
    assert words in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
    assert not (pp / TINY.folder_name / "nnresume.sqlite").exists(), "nothing may run on a refused budget"


@pytest.mark.parametrize("config, near", [("4d", None), ("3d_fulres", "3d_fullres")])
def test_a_configuration_typo_is_a_usage_error_before_any_work(tiny: tuple[Path, Path], config: str,
                                                              near: str | None) -> None:
    raw, pp = tiny
    r = run_nnresume(raw, pp, "preprocess", "-d", str(TINY.dataset_id), "-c", "2d", config, "--no-pbar", expect=2)
    assert f"-c {config}" in r.stderr and "Traceback" not in r.stderr
    if near:
        assert f"did you mean {near}" in r.stderr
    assert not (pp / TINY.folder_name / "nnresume.sqlite").exists()


def test_unknown_dataset_is_a_usage_error_and_status_needs_no_raw_folder(tiny: tuple[Path, Path]) -> None:
    raw, pp = tiny
    r = run_nnresume(raw, pp, "preprocess", "-d", "932", "--no-pbar", expect=2)
    assert "no dataset with id 932" in r.stderr
    r = run_nnresume(raw, pp, "status", "-d", "932", expect=2)
    assert "no dataset with id 932" in r.stderr


@pytest.mark.slow
def test_missing_image_orphan_label_and_numtraining_are_named(tiny: tuple[Path, Path]) -> None:
    """A label whose image was deleted is not dropped silently: preprocess, status and check all name it."""
    raw, pp = tiny
    ds = raw / TINY.folder_name
    (ds / "imagesTr" / "tiny_0002_0000.nii.gz").unlink()  # its label stays: nnU-Net would just leave it out
    did = str(TINY.dataset_id)
    dry = run_nnresume(raw, pp, "preprocess", "-d", did, "--dry-run").stdout
    assert "tiny_0002" in dry and "label has no image files" in dry and "numTraining=4" in dry
    r = run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar", expect=3)
    summary = r.stderr[r.stderr.index(f"{TINY.folder_name}: completed"):]
    assert "tiny_0002" in summary and "label has no image files in imagesTr" in summary
    assert "numTraining=4 but 3 training case(s)" in summary
    status = json.loads(run_nnresume(raw, pp, "status", "-d", did, "--json").stdout)
    (failure,) = status["failures"]
    assert failure["case"] == "tiny_0002" and "tiny_0002_0000.nii.gz" in failure["reason"]
    assert "numTraining" in status["problems"][0]["message"]
    # the three cases with images are preprocessed as nnU-Net would (it counts 3 cases)
    assert status["stages"]["nnUNetPlans_3d_fullres"]["counts"]["done"] == 3
    check = json.loads(run_nnresume(raw, pp, "check", "-d", did, "--json", expect=3).stdout)
    errors = [f["message"] for f in check["datasets"][0]["findings"] if f["level"] == "error"]
    assert any("tiny_0002" in m and "no image files" in m for m in errors) and any("numTraining" in m for m in errors)
    # images back: the case is preprocessed, the problems are gone
    make_dataset(TINY, raw)
    run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar")
    status = json.loads(run_nnresume(raw, pp, "status", "-d", did, "--json").stdout)
    assert status["failures"] == [] and status["problems"] == []


@pytest.mark.slow
def test_class_names_are_checked_before_any_work(tiny: tuple[Path, Path]) -> None:
    raw, pp = tiny
    did = str(TINY.dataset_id)
    r = run_nnresume(raw, pp, "preprocess", "-d", did, "-pl", "nnUNetPlannerResEncm", "-fpe", "NoSuchExtractor",
                     "--no-pbar", expect=2)
    assert "-pl nnUNetPlannerResEncm" in r.stderr and "did you mean nnUNetPlannerResEncM" in r.stderr
    assert "-fpe NoSuchExtractor" in r.stderr and "Traceback" not in r.stderr
    ledger = pp / TINY.folder_name / "nnresume.sqlite"
    assert ledger_query(ledger, "select count(*) from attempts where stage='fingerprint'")[0][0] == 0


@pytest.mark.slow
def test_report_draws_the_last_run_that_did_work_without_library_warnings(finished_small: Workspace,
                                                                          tmp_path: Path) -> None:
    raw, pp = finished_small.raw, finished_small.pp
    did = str(SMALL.dataset_id)
    first = finished_small.first_run  # with progress bars
    bars = [line for line in first.stderr.replace("\r", "\n").splitlines() if "Preprocess:" in line and "100%" in line]
    assert bars and "running=0" in bars[-1], "the finished bar must not show cases running"
    run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar")  # nothing to do
    # status reads the ledger only: it needs nnUNet_preprocessed, not nnUNet_raw
    env = env_for(raw, pp)
    del env["nnUNet_raw"]
    status = subprocess.run(nnresume_cmd("status", "-d", did), env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "peak tree memory ?" not in status.stdout and "no case ran" in status.stdout
    r = run_nnresume(raw, pp, "report", "-d", did, "-o", str(tmp_path / "report"))
    assert r.stderr.strip() == "", r.stderr
    html_path = Path(r.stdout.split()[0])
    assert html_path.name.endswith("run1.html")
    data = json.loads(re.search(r'id="nnresume-data">(.*?)</script>', html_path.read_text(), re.S).group(1))
    assert any(c["stage"] == "preprocess" for c in data["cases"])
    assert all(c["private_peak_bytes"] for c in data["cases"] if c["stage"] in ("fingerprint", "preprocess"))
    shutil.rmtree(tmp_path / "report")
