"""The command line: help for every command, nnU-Net-style multi-value options, status --json, report, --dry-run."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from nnresume.cli import NnUNetStyleCommand, main

from .conftest import SMALL, Workspace, ledger_query, run_nnresume


def test_every_command_has_help() -> None:
    runner = CliRunner()
    assert main.commands, "no commands"
    for name, command in main.commands.items():
        assert command.help and len(command.help) > 20, f"{name} has no help"
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts} has no help"


def test_nnunet_style_values_after_one_flag() -> None:
    seen = {}

    @click.command(cls=NnUNetStyleCommand)
    @click.option("-d", multiple=True)
    @click.option("-c", multiple=True)
    @click.option("-np", type=int)
    @click.option("-overwrite_target_spacing", multiple=True)
    def cmd(d, c, np, overwrite_target_spacing):  # type: ignore[no-untyped-def]
        seen.update(d=d, c=c, np=np, s=overwrite_target_spacing)

    r = CliRunner().invoke(cmd, ["-d", "1", "Dataset002_X", "-c", "2d", "3d_fullres", "-np", "4",
                                 "-overwrite_target_spacing", "1", "0.5", "0.5"])
    assert r.exit_code == 0, r.output
    assert seen == {"d": ("1", "Dataset002_X"), "c": ("2d", "3d_fullres"), "np": 4, "s": ("1", "0.5", "0.5")}


def test_usage_errors_exit_2_without_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    r = CliRunner().invoke(main, ["preprocess", "-d", "1"])
    assert r.exit_code == 2 and "nnUNet_raw" in r.output and "Traceback" not in r.output
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    r = CliRunner().invoke(main, ["preprocess", "-d", "1", "--max-ram", "lots"])
    assert r.exit_code == 2 and "cannot read memory size" in r.output


@pytest.mark.slow
def test_status_report_and_dry_run(raw_root: Path, finished_small: Workspace, tmp_path: Path) -> None:
    did = str(SMALL.dataset_id)
    dry = run_nnresume(raw_root, tmp_path / "empty", "preprocess", "-d", did, "--dry-run").stdout
    assert f"fingerprint: {SMALL.num_cases} to analyse" in dry and "new case" in dry
    assert not (tmp_path / "empty" / SMALL.folder_name / "nnresume.sqlite").exists(), \
        "a dry run must not create the ledger"

    raw, pp = finished_small.raw, finished_small.pp
    bars = finished_small.first_run.stderr.replace("\r", "\n")  # the run that made it had progress bars
    for stage in ("Fingerprint", "Preprocess"):
        assert re.search(rf"{stage}: 100%.*{SMALL.num_cases}/{SMALL.num_cases}.*done={SMALL.num_cases} failed=0 "
                         r"skipped=0 RAM [\d.]+ [KMG]iB/[\d.]+ GiB", bars), f"no finished {stage} bar"
    dataset = pp / SMALL.folder_name
    status = json.loads(run_nnresume(raw, pp, "status", "-d", did, "--json").stdout)
    assert status["cases"] == SMALL.num_cases and status["failures"] == []
    assert status["stages"]["fingerprint"]["counts"]["done"] == SMALL.num_cases
    for ident in ("nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"):
        st = status["stages"][ident]
        assert st["counts"]["done"] == SMALL.num_cases and st["peak_rss_max"] > 0
    assert status["last_run"]["state"] == "completed" and status["last_run"]["budget_bytes"] > 0
    text = run_nnresume(raw, pp, "status", "-d", did).stdout
    assert re.search(r"nnUNetPlans_3d_fullres\s+3d_fullres\s+8\s+0\s+0\s+0\s+0", text), text

    # report: files exist, and the series in the page are the ledger's
    out = tmp_path / "report"
    paths = run_nnresume(raw, pp, "report", "-d", did, "-o", str(out)).stdout.split()
    html_path, png_path = Path(paths[0]), Path(paths[1])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 20_000
    page = html_path.read_text()
    data = json.loads(re.search(r'<script type="application/json" id="nnresume-data">(.*?)</script>', page,
                                re.S).group(1))
    ledger = dataset / "nnresume.sqlite"
    n_samples = ledger_query(ledger, "select count(*) from memory_samples where run_id=1")[0][0]
    assert n_samples > 0 and len(data["memory"]["t"]) == len(data["memory"]["tree_bytes"]) == n_samples
    assert all(b > 0 for b in data["memory"]["tree_bytes"])
    attempts = ledger_query(ledger, "select case_name, stage from attempts where run_id=1 order by id")
    assert [(c["case"], c["stage"]) for c in data["cases"]] == attempts
    assert {c["stage"] for c in data["cases"]} == {"fingerprint", "preprocess", "reader", "aggregate", "plan"}
    per_case = [c for c in data["cases"] if c["stage"] in ("fingerprint", "preprocess")]
    assert len(per_case) == 2 * SMALL.num_cases
    assert all(c["duration_s"] > 0 and c["peak_rss_bytes"] > 0 for c in per_case)

    # dry run reasons: touched (content unknown until hashed), output missing, configuration changed
    img = raw / SMALL.folder_name / "imagesTr" / "small_0001_0000.nii.gz"
    img.touch()
    (dataset / "nnUNetPlans_2d" / "small_0004.b2nd").unlink()
    plans = json.loads((dataset / "nnUNetPlans.json").read_text())
    old_patch = plans["configurations"]["3d_fullres"]["patch_size"]
    plans["configurations"]["3d_fullres"]["patch_size"] = [p // 2 for p in old_patch]  # the arrays' blosc2 chunks
    (dataset / "nnUNetPlans.json").write_text(json.dumps(plans))
    before = ledger_query(ledger, "select count(*) from runs")[0][0]
    dry = run_nnresume(raw, pp, "preprocess", "-d", did, "--dry-run").stdout
    assert "1 image file size or time changed: small_0001" in dry, dry
    assert re.search(r"2d: 1 case\(s\) to preprocess\n\s+1 output missing: small_0004", dry), dry
    assert re.search(r"3d_fullres: 8 case\(s\) to preprocess\n\s+8 configuration changed", dry), dry
    assert f"plans changed: 3d_fullres patch_size {json.dumps(old_patch)} -> " in dry, dry
    assert ledger_query(ledger, "select count(*) from runs")[0][0] == before, "a dry run must not record a run"
    assert not (dataset / "nnUNetPlans_2d" / "small_0004.b2nd").exists()
    # and the real run does what the dry run said
    run_nnresume(raw, pp, "preprocess", "-d", did, "-np", "2", "--no-pbar")
    last = ledger_query(ledger, "select max(id) from runs")[0][0]
    redone = set(ledger_query(ledger, "select c.name, o.data_identifier from outputs o join cases c on "
                                      "c.id=o.case_id where o.run_id=?", (last,)))
    assert redone == {("small_0004", "nnUNetPlans_2d")} | {(f"small_{i:04d}", "nnUNetPlans_3d_fullres")
                                                           for i in range(SMALL.num_cases)}
    shutil.rmtree(out)
