"""Kill anywhere, lose nothing, never trust a partial file: deterministic crash points, a kill from outside, `verify`,
the dataset lock, SIGINT/SIGTERM, and a full disk, each with real processes and real files.

The crash points are met one after another by successive runs on one dataset, each run killed at its point (the
points lie in different stages, so each run starts where the previous one died): after every kill the ledger must be
consistent and vouch only for complete files, and the run that finally completes must equal nnU-Net's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from nnresume.compare import compare_folders

from .conftest import (
    SMALL,
    SMALL_FOLDERS,
    References,
    Workspace,
    copy_dataset,
    done_outputs,
    last_run,
    ledger_query,
    redone,
    run_nnresume,
    start_nnresume,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.references("small")]

ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")
OUTPUT_NAME = re.compile(r"^small_\d{4}(\.b2nd|_seg\.b2nd|\.pkl|\.nii\.gz)$")
TOTAL = SMALL.num_cases * len(SMALL_FOLDERS)


def _files_in_data_folders(dataset: Path) -> list[Path]:
    return [p for f in SMALL_FOLDERS if (dataset / f).is_dir() for p in (dataset / f).iterdir()]


def _assert_consistent(dataset: Path, raw: Path, pp: Path, point: str) -> None:
    """The ledger is intact, no temporary file is in a configuration folder, and every output the ledger calls done
    is complete (`verify --full` finds nothing)."""
    ledger = dataset / "nnresume.sqlite"
    assert ledger_query(ledger, "PRAGMA integrity_check") == [("ok",)], point
    strays = [p.name for p in _files_in_data_folders(dataset) if not OUTPUT_NAME.match(p.name)]
    assert strays == [], f"after {point}: temporary files in a configuration folder: {strays}"
    v = run_nnresume(raw, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json", expect=0)
    assert json.loads(v.stdout)["problems"] == [], point


def _ram_read_caches() -> list[Path]:
    from nnresume.io.readcache import PREFIX, RAM_FOLDER

    return list(RAM_FOLDER.glob(PREFIX + "*")) if RAM_FOLDER.is_dir() else []


def _room_for_read_cache_in_ram() -> bool:
    from nnresume.io.readcache import RAM_FOLDER, TOTAL

    return os.access(RAM_FOLDER, os.W_OK) and shutil.disk_usage(RAM_FOLDER).free // 4 >= TOTAL


def _done_rows(ledger: Path) -> dict[tuple[str, str], int]:
    return {(c, d): r for c, d, r in ledger_query(
        ledger, "select c.name, o.data_identifier, o.run_id from outputs o join cases c on c.id=o.case_id "
                "where o.state='done'")}


# each preprocessing task stays a second in each configuration's staged files: long enough to be seen running
SLOW_CASES = {"NNRESUME_CRASH_AT": "staged@/preprocess=pause:1"}

# the orchestrator's crash points in the order a run meets them, with NNRESUME_GROUP_WINDOW=0 (a commit per result,
# so that the group points are met in a run that has only a few outputs left)
PREPROCESSING_POINTS = ["between_renames:3", "renamed:5", "ledger_commit:4", "group_files_synced:2", "group_synced:2"]


def test_crash_points_and_a_kill_from_outside_lose_nothing(raw_root: Path, references: References,
                                                           tmp_path: Path) -> None:
    """A SIGKILL at each crash point of the write path, then one from outside mid-run, each resumed on the same
    dataset, and the end identical to nnU-Net's. About a minute: every kill needs its own real process and resume,
    which is the point; chained on one dataset they share what the points before left."""
    raw, pp = copy_dataset(raw_root, SMALL, tmp_path / "raw"), tmp_path / "pp"
    dataset = pp / SMALL.folder_name
    ledger = dataset / "nnresume.sqlite"

    caches: set[Path] = set()  # the read cache in RAM of the run killed at fingerprint_aggregate

    def killed_at(point: str) -> None:
        before = set(_ram_read_caches())
        r = run_nnresume(raw, pp, *ARGS, expect=None, NNRESUME_CRASH_AT=point, NNRESUME_GROUP_WINDOW="0")
        assert r.returncode == -signal.SIGKILL, f"{point} was not reached:\n{r.stderr[-3000:]}"
        holder = json.loads((dataset / ".nnresume" / "lock").read_text())
        assert not psutil.pid_exists(holder["pid"]), "the dead run's lock file names it (the next run takes it over)"
        if point == "fingerprint_aggregate":
            # every case fingerprinted, none preprocessed: the killed run's read cache is still in RAM
            left = set(_ram_read_caches()) - before
            if _room_for_read_cache_in_ram():
                assert len(left) == 1 and any(p.suffix == ".pkl" for p in next(iter(left)).iterdir()), left
            assert not (dataset / "dataset_fingerprint.json").exists()
            caches.update(left)
        elif point == "plans_write":
            assert not any(p.exists() for p in caches), "the next run removes a killed run's read cache from RAM"
            assert not list(dataset.glob("nnUNetPlans*.json")), "half-written plans under their name"
        _assert_consistent(dataset, raw, pp, point)

    killed_at("fingerprint_aggregate")
    killed_at("plans_write")
    for point in PREPROCESSING_POINTS:  # each run commits fewer outputs than its point's count
        killed_at(point)
        assert len(_done_rows(ledger)) < TOTAL, f"the run killed at {point} left nothing for the next steps"

    # SIGKILL from outside to the orchestrator alone, part-way through preprocessing (its cases slowed down, so that
    # it is): its workers must not outlive it
    done_before = len(_done_rows(ledger))
    proc = start_nnresume(raw, pp, *ARGS, **SLOW_CASES)
    wait_for(lambda: done_outputs(ledger) >= done_before + 3, timeout=300, proc=proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "orphaned workers"
    kept = _done_rows(ledger)
    assert done_before < len(kept) < TOTAL, f"kill was not part-way: {len(kept)} of {TOTAL} done"
    status = json.loads(run_nnresume(raw, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    assert status["last_run"]["state"] == "interrupted"
    killed_run = last_run(ledger)
    _assert_consistent(dataset, raw, pp, "kill from outside")

    run_nnresume(raw, pp, *ARGS)
    after = _done_rows(ledger)
    assert len(after) == TOTAL
    for key, run_id in kept.items():
        assert after[key] == run_id, f"{key}, done before the kill from outside, was recomputed"
    for case, targets in ledger_query(ledger, "select case_name, targets from attempts where run_id>? and "
                                              "stage='preprocess'", (killed_run,)):
        assert not {(case, ident) for ident in json.loads(targets)} & set(kept), f"{case} was attempted again"
    runs = ledger_query(ledger, "select id, status, end_reason from runs order by id")
    assert [s for _, s, _ in runs] == ["interrupted"] * (len(runs) - 1) + ["completed"]
    assert all("process gone" in reason for i, _, reason in runs[:-1]), runs
    _assert_consistent(dataset, raw, pp, "the final run")
    assert compare_folders(dataset, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []
    v = run_nnresume(raw, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json", expect=0)
    assert json.loads(v.stdout)["unvouched"] == []
    assert not list((dataset / ".nnresume" / "staging").glob("*/*")), "staging left behind"


def test_verify_finds_truncated_corrupted_and_deleted_outputs(finished_small: Workspace,
                                                             references: References) -> None:
    raw, pp, dataset = finished_small.raw, finished_small.pp, finished_small.dataset
    truncated = dataset / "nnUNetPlans_3d_fullres" / "small_0001.b2nd"
    flipped = dataset / "nnUNetPlans_2d" / "small_0004_seg.b2nd"
    deleted = dataset / "nnUNetPlans_2d" / "small_0006.pkl"
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    deleted.unlink()

    quick = json.loads(run_nnresume(raw, pp, "verify", "-d", str(SMALL.dataset_id), "--json", expect=3).stdout)
    assert {(p["case"], p["where"]) for p in quick["problems"]} == {
        ("small_0001", "nnUNetPlans_3d_fullres"), ("small_0006", "nnUNetPlans_2d")}
    full = json.loads(run_nnresume(raw, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json",
                                   expect=3).stdout)
    found = {(p["case"], p["where"]): p["problem"] for p in full["problems"]}
    assert "small_0004" in {c for c, _ in found} and "checksum" in found[("small_0004", "nnUNetPlans_2d")]
    # the next preprocess redoes exactly those three (case, configuration) pairs
    run_nnresume(raw, pp, *ARGS)
    assert redone(finished_small.ledger, last_run(finished_small.ledger)) == {
        ("small_0001", "nnUNetPlans_3d_fullres"), ("small_0004", "nnUNetPlans_2d"), ("small_0006", "nnUNetPlans_2d")}
    assert compare_folders(dataset, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []
    run_nnresume(raw, pp, "verify", "-d", str(SMALL.dataset_id), "--full", expect=0)


def _stopped_by(proc: subprocess.Popen, sig: int, code: int, to_group: bool, ledger: Path) -> tuple[dict, float]:
    """Sends `sig` to a run whose cases are running; checks the clean stop; returns the states of the outputs that
    were running when it was sent, and the seconds the run took to stop."""
    wait_for(lambda: ledger_query(ledger, "select count(*) from outputs where state='running' and "
                                          "data_identifier != 'gt_segmentations'")[0][0] > 0, timeout=300, proc=proc)
    running = set(ledger_query(ledger, "select case_id, data_identifier from outputs where state='running'"))
    children = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode == code, out
    assert "run the same command again" in out.lower() and "Traceback" not in out
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "orphaned processes"
    status, reason = ledger_query(ledger, "select status, end_reason from runs order by id desc limit 1")[0]
    assert status == "interrupted" and signal.Signals(sig).name in reason
    assert ledger_query(ledger, "select count(*) from outputs where state='running'")[0][0] == 0
    states = {(c, d): s for c, d, s in ledger_query(ledger, "select case_id, data_identifier, state from outputs")}
    return {k: states[k] for k in running}, seconds


def test_a_running_dataset_is_locked_and_signals_stop_it_cleanly(raw_root: Path, references: References,
                                                                 tmp_path: Path) -> None:
    raw, pp = copy_dataset(raw_root, SMALL, tmp_path / "raw"), tmp_path / "pp"
    dataset = pp / SMALL.folder_name
    ledger = dataset / "nnresume.sqlite"

    first = start_nnresume(raw, pp, *ARGS, "--grace", "120", **SLOW_CASES)
    # status from another shell while it runs; a second run is refused, naming the first
    wait_for(lambda: ledger.exists() and ledger_query(
        ledger, "select count(*) from attempts where outcome='ok' and stage='preprocess'")[0][0] > 0,
        timeout=300, proc=first)
    live = json.loads(run_nnresume(raw, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    assert live["last_run"]["state"] == "running" and live["last_run"]["ended_at"] is None
    assert live["progress"]["remaining_cases"] > 0 and live["progress"]["eta_s"] is not None
    second = run_nnresume(raw, pp, *ARGS, expect=1)
    assert f"PID {first.pid}" in second.stderr and "host" in second.stderr and "since" in second.stderr

    # SIGTERM (a scheduler's time limit): the running cases may finish within the grace period
    was_running, _ = _stopped_by(first, signal.SIGTERM, 143, False, ledger)
    assert was_running and all(s == "done" for s in was_running.values()), "running cases were not let finish"

    # Ctrl-C reaches the whole process group; with no grace the running cases stop at once
    third = start_nnresume(raw, pp, *ARGS, "--grace", "0", **SLOW_CASES)
    _, seconds = _stopped_by(third, signal.SIGINT, 130, True, ledger)
    assert seconds < 30

    run_nnresume(raw, pp, *ARGS)
    assert [s for (s,) in ledger_query(ledger, "select status from runs order by id")] == \
        ["interrupted", "interrupted", "completed"], "the refused run is not a run"
    assert compare_folders(dataset, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["umount", str(path)], check=True)
    return True


def _fill(path: Path) -> None:
    """Writes until the file system is full, as another program filling the disk would."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_disk_full_fails_cleanly_and_the_rerun_continues(raw_root: Path, references: References,
                                                         tmp_path: Path) -> None:
    mount = tmp_path / "fs"
    if not _can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs root or a user namespace)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300M", "tmpfs", str(mount)], check=True)
    try:
        pp = mount / "pp"
        dataset = pp / SMALL.folder_name
        ledger = dataset / "nnresume.sqlite"
        proc = start_nnresume(raw_root, pp, *ARGS[:-1], "-np", "1", "--no-pbar")
        wait_for(lambda: ledger.exists() and done_outputs(ledger) >= 4, timeout=300, proc=proc)
        filler = mount / "filler"
        _fill(filler)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, out
        assert "no space left on device" in out and str(pp) in out, out
        assert "Traceback" not in out
        filler.unlink()
        assert 4 <= done_outputs(ledger) < TOTAL
        _assert_consistent(dataset, raw_root, pp, "disk full")
        run_nnresume(raw_root, pp, *ARGS)
        assert compare_folders(dataset, references.get("small"), SMALL_FOLDERS, ["nnUNetPlans.json"]) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)])
