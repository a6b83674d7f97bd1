"""A worker that dies (SIGKILL as from the OOM killer, a segfault, an exit without a word, MemoryError, a kill from
outside) is noticed at once, its case retried, and the run completes with outputs identical to nnU-Net's; after three
deaths a case is quarantined with the reason and the run still finishes.

One run meets every kind of death, each on its own case (crash points, io/crashpoints.py): a death costs a case one
retry whatever else dies beside it, so one run proves each kind as well as a run per kind did.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from nnresume.compare import compare_folders

from .conftest import (
    SMALL,
    SMALL_FOLDERS,
    References,
    copy_dataset,
    last_run,
    ledger_query,
    redone,
    run_nnresume,
    start_nnresume,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.references("small")]

ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")

# case -> (crash point spec, words in its death's message); each dies once (NNRESUME_CRASH_ONCE)
DEATHS = {
    "small_0002": ("staged@small_0002=kill", "killed by SIGKILL"),  # in the fingerprint stage
    "small_0003": ("staged@small_0003=segv", "killed by SIGSEGV"),
    "small_0004": ("staged@small_0004=exit", "exited with code 3 without reporting"),
    "small_0005": ("staged@small_0005=memory", "MemoryError"),
    # in the preprocessing stage, after its first configuration was staged and sent
    "small_0001": ("staged:2@small_0001=kill", "killed by SIGKILL"),
}
OUTSIDE = "small_0006"  # its worker waits in preprocessing until the test kills it with SIGKILL from outside
QUARANTINED = "small_0007"  # its worker dies in preprocessing every time


def test_every_kind_of_worker_death_is_retried_and_three_quarantine(raw_root: Path, references: References,
                                                                      tmp_path: Path) -> None:
    raw, pp = copy_dataset(raw_root, SMALL, tmp_path / "raw"), tmp_path / "pp"
    dataset = pp / SMALL.folder_name
    ledger = dataset / "nnresume.sqlite"
    specs = [spec for spec, _ in DEATHS.values()]
    specs += ["staged@(dataset)=kill",  # the aggregation's worker, its dataset_fingerprint.json staged
              f"staged@{OUTSIDE}/preprocess=pause:120", f"staged@{QUARANTINED}/preprocess=kill*"]
    once = tmp_path / "crashed"
    proc = start_nnresume(raw, pp, *ARGS, NNRESUME_CRASH_AT=",".join(specs), NNRESUME_CRASH_ONCE=str(once))
    paused = Path(f"{once}.{specs.index(f'staged@{OUTSIDE}/preprocess=pause:120')}")
    wait_for(lambda: paused.exists() and paused.read_text() != "", timeout=300, proc=proc)
    os.kill(int(paused.read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out
    assert "Traceback" not in out
    for i in range(len(DEATHS)):
        assert Path(f"{once}.{i}").exists(), f"crash point {specs[i]} was not reached"

    for case, (spec, words) in DEATHS.items():
        attempts = ledger_query(ledger, "select stage, outcome, message from attempts where case_name=? order by id",
                                (case,))
        bad = [a for a in attempts if a[1] != "ok"]
        assert len(bad) == 1 and words in bad[0][2], (spec, attempts)
    # small_0001: the configuration committed before the death was not redone
    preprocess = ledger_query(ledger, "select outcome, targets from attempts where case_name='small_0001' and "
                                      "stage='preprocess' order by id")
    assert [o for o, _ in preprocess] == ["died", "ok"] and len(json.loads(preprocess[-1][1])) == 2, preprocess
    assert "aggregate step's worker was killed by SIGKILL" in out and "retrying" in out
    outside = ledger_query(ledger, "select outcome, signal from attempts where case_name=? and stage='preprocess' "
                                   "order by id", (OUTSIDE,))
    assert outside == [("died", signal.SIGKILL), ("ok", None)], outside

    assert QUARANTINED in out and "quarantined" in out
    status = json.loads(run_nnresume(raw, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    failures = [f for f in status["failures"] if f["case"] == QUARANTINED]
    assert failures and all(f["state"] == "quarantined" and "SIGKILL" in f["reason"] and "budget" in f["reason"]
                            for f in failures), failures
    assert {f["case"] for f in status["failures"]} == {QUARANTINED}
    deaths = ledger_query(ledger, "select count(*) from attempts where case_name=? and outcome='died'", (QUARANTINED,))
    assert deaths[0][0] == 3
    for ident in SMALL_FOLDERS:
        assert status["stages"][ident]["counts"]["done"] == SMALL.num_cases - 1

    # nothing changed: a plain rerun leaves it quarantined; --retry-quarantined tries again, and only it
    run_nnresume(raw, pp, *ARGS, expect=3)
    run_nnresume(raw, pp, *ARGS, "--retry-quarantined")
    assert {c for c, _ in redone(ledger, last_run(ledger))} == {QUARANTINED}
    assert compare_folders(dataset, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []
