"""A worker that dies (SIGKILL as from the OOM killer, a segfault, an exit without a word, MemoryError) is noticed at
once, its case retried, and the run completes with outputs identical to nnU-Net's; after three deaths the case is
quarantined with the reason and the run still finishes."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from nnresume.compare import compare_folders

from .conftest import BIG, BIG_ARGS, SMALL, References, ledger_query, run_nnresume, start_nnresume, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from kill_campaign import workers_of  # noqa: E402

pytestmark = pytest.mark.slow

FOLDERS = ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"]
ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")


@pytest.mark.parametrize("point, how, expected", [
    ("staged", "kill", "killed by SIGKILL"),
    ("staged", "segv", "killed by SIGSEGV"),
    ("staged", "exit", "exited with code 3 without reporting"),
    ("staged", "memory", "MemoryError"),
    ("staged:2", "kill", "killed by SIGKILL"),  # preprocess stage, after its first configuration was committed
], ids=["sigkill-fingerprint", "sigsegv", "silent-exit", "memoryerror", "sigkill-mid-preprocess"])
def test_worker_death_is_retried(point: str, how: str, expected: str, raw_root: Path, references: References,
                                 tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    marker = tmp_path / "crashed"
    run_nnresume(raw_root, pp, *ARGS, NNRESUME_CRASH_AT=point, NNRESUME_CRASH_CASE="small_0003",
                 NNRESUME_CRASH_ONCE=str(marker), NNRESUME_CRASH_HOW=how)
    assert marker.exists(), "the crash point was not reached"
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    attempts = ledger_query(ledger, "select stage, outcome, message from attempts where case_name='small_0003' "
                                    "order by id")
    bad = [a for a in attempts if a[1] != "ok"]
    assert len(bad) == 1 and expected in bad[0][2], attempts
    if point == "staged:2":
        assert bad[0][0] == "preprocess"
        # the configuration committed before the death was not redone
        committed = ledger_query(ledger, "select count(*) from attempts where case_name='small_0003' "
                                         "and stage='preprocess'")[0][0]
        retried_targets = json.loads(ledger_query(
            ledger, "select targets from attempts where case_name='small_0003' and stage='preprocess' "
                    "order by id desc limit 1")[0][0])
        assert committed == 2 and len(retried_targets) == 2
    assert compare_folders(pp / SMALL.folder_name, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []


def test_a_dataset_step_whose_worker_dies_is_retried(raw_root: Path, references: References, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    # the aggregation worker stages dataset_fingerprint.json, then dies before reporting
    r = run_nnresume(raw_root, pp, *ARGS, NNRESUME_CRASH_AT="staged", NNRESUME_CRASH_CASE="(dataset)",
                     NNRESUME_CRASH_ONCE=str(tmp_path / "once"))
    assert "aggregate step's worker was killed by SIGKILL" in r.stderr and "retrying" in r.stderr
    assert compare_folders(pp / SMALL.folder_name, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []


def test_three_deaths_quarantine_the_case_and_the_run_goes_on(raw_root: Path, references: References,
                                                              tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    r = run_nnresume(raw_root, pp, *ARGS, expect=3, NNRESUME_CRASH_AT="staged", NNRESUME_CRASH_CASE="small_0003")
    assert "small_0003" in r.stderr and "quarantined" in r.stderr
    status = json.loads(run_nnresume(raw_root, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    assert status["stages"]["fingerprint"]["counts"]["quarantined"] == 1
    assert status["stages"]["fingerprint"]["counts"]["done"] == SMALL.num_cases - 1
    (failure,) = [f for f in status["failures"] if f["case"] == "small_0003" and f["stage"] == "fingerprint"]
    assert failure["state"] == "quarantined" and "SIGKILL" in failure["reason"] and "budget" in failure["reason"]
    for ident in FOLDERS:
        assert status["stages"][ident]["counts"]["done"] == SMALL.num_cases - 1
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    deaths = ledger_query(ledger, "select count(*) from attempts where case_name='small_0003' and outcome='died'")
    assert deaths[0][0] == 3

    # nothing changed: a plain rerun leaves it quarantined; --retry-quarantined tries again
    run_nnresume(raw_root, pp, *ARGS, expect=3)
    run_nnresume(raw_root, pp, *ARGS, "--retry-quarantined")
    assert compare_folders(pp / SMALL.folder_name, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []


def test_worker_killed_from_outside_mid_case(raw_root: Path, references: References, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ledger = pp / BIG.folder_name / "nnresume.sqlite"
    proc = start_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "-np", "2", "--no-pbar", *BIG_ARGS)
    wait_for(lambda: ledger.exists() and ledger_query(
        ledger, "select count(*) from outputs where state='running' and data_identifier like 'nnUNetPlans_%'"
    )[0][0] > 0 and workers_of(proc.pid), timeout=300, proc=proc)
    victim = workers_of(proc.pid)[0]
    os.kill(victim.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    died = ledger_query(ledger, "select case_name, signal from attempts where outcome='died'")
    assert len(died) == 1 and died[0][1] == signal.SIGKILL
    assert "retrying" in out
    reference = references.get(BIG, tuple(BIG_ARGS))
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert compare_folders(pp / BIG.folder_name, reference, folders, ["nnUNetPlans.json"]) == []
