"""A real `nnresume preprocess` killed with SIGKILL part-way resumes: finished cases are not recomputed and the final
outputs equal nnU-Net's."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from nnresume.compare import compare_folders

from .conftest import SMALL, References, done_outputs, ledger_query, run_nnresume, start_nnresume, wait_for

pytestmark = pytest.mark.slow



def test_sigkill_midway_then_rerun_redoes_only_unfinished(raw_root: Path, references: References,
                                                          tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    args = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")
    proc = start_nnresume(raw_root, pp, *args)
    total = SMALL.num_cases * 3  # 2d, 3d_fullres, gt_segmentations
    wait_for(lambda: ledger.exists() and done_outputs(ledger) >= 6, timeout=300, proc=proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator alone; its workers must not outlive it
    proc.wait(timeout=30)
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    before = dict(((c, d), r) for c, d, r in ledger_query(
        ledger, "select c.name, o.data_identifier, o.run_id from outputs o join cases c on c.id=o.case_id "
                "where o.state='done'"))
    assert 0 < len(before) < total, f"kill was not part-way: {len(before)} of {total} done"
    status = json.loads(run_nnresume(raw_root, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    assert status["last_run"]["state"] == "interrupted"

    run_nnresume(raw_root, pp, *args)

    after = dict(((c, d), (r, s)) for c, d, r, s in ledger_query(
        ledger, "select c.name, o.data_identifier, o.run_id, o.state from outputs o join cases c on c.id=o.case_id"))
    assert len(after) == total and all(s == "done" for _, s in after.values())
    for key, run_id in before.items():
        assert after[key][0] == run_id, f"{key} was recomputed"
    second_run = ledger_query(ledger, "select max(id) from runs")[0][0]
    redone = ledger_query(ledger, "select case_name, targets from attempts where run_id=? and stage='preprocess'",
                          (second_run,))
    for case, targets in redone:
        for ident in json.loads(targets):
            assert (case, ident) not in before
    runs = ledger_query(ledger, "select id, status, end_reason from runs order by id")
    assert runs[0][1] == "interrupted" and "process gone" in runs[0][2]
    assert runs[1][1] == "completed"
    assert compare_folders(pp / SMALL.folder_name, references.get(SMALL),
                           ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"],
                           ["nnUNetPlans.json"]) == []
    assert not list((pp / SMALL.folder_name / ".nnresume" / "staging").glob("*/*")), "staging left behind"
