"""Kill anywhere, lose nothing, never trust a partial file: deterministic crash points, `verify`, the dataset lock,
SIGINT/SIGTERM, and a full disk, each with real processes and real files."""
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
    BIG,
    BIG_ARGS,
    SMALL,
    References,
    done_outputs,
    ledger_query,
    run_nnresume,
    start_nnresume,
    wait_for,
)

pytestmark = pytest.mark.slow

ARGS = ("preprocess", "-d", str(SMALL.dataset_id), "-np", "2", "--no-pbar")
FOLDERS = ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"]
OUTPUT_NAME = re.compile(r"^small_\d{4}(\.b2nd|_seg\.b2nd|\.pkl|\.nii\.gz)$")


def _files_in_data_folders(dataset: Path) -> list[Path]:
    return [p for f in FOLDERS if (dataset / f).is_dir() for p in (dataset / f).iterdir()]


def _assert_consistent(dataset: Path) -> None:
    ledger = dataset / "nnresume.sqlite"
    assert ledger_query(ledger, "PRAGMA integrity_check") == [("ok",)]
    strays = [p.name for p in _files_in_data_folders(dataset) if not OUTPUT_NAME.match(p.name)]
    assert strays == [], f"temporary files in a configuration folder: {strays}"


def _ram_read_caches() -> list[Path]:
    from nnresume.io.readcache import PREFIX, RAM_FOLDER

    return list(RAM_FOLDER.glob(PREFIX + "*")) if RAM_FOLDER.is_dir() else []


def _room_for_read_cache_in_ram() -> bool:
    from nnresume.io.readcache import RAM_FOLDER, TOTAL

    return os.access(RAM_FOLDER, os.W_OK) and shutil.disk_usage(RAM_FOLDER).free // 4 >= TOTAL


@pytest.mark.parametrize("point, who", [
    ("staged", "worker"),
    ("between_renames:3", "orchestrator"),
    ("renamed:5", "orchestrator"),
    ("ledger_commit:4", "orchestrator"),
    ("group_files_synced:2", "orchestrator"),  # a group's files durable, its folders not yet fsynced, no commit
    ("group_synced:2", "orchestrator"),  # everything durable, the group's ledger commit not made
    ("fingerprint_aggregate", "orchestrator"),
    ("plans_write", "orchestrator"),
])
def test_crash_point(point: str, who: str, raw_root: Path, references: References, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    dataset = pp / SMALL.folder_name
    env = {"NNRESUME_CRASH_AT": point}
    if who == "worker":
        env |= {"NNRESUME_CRASH_CASE": "small_0002", "NNRESUME_CRASH_ONCE": str(tmp_path / "once")}
        run_nnresume(raw_root, pp, *ARGS, **env)  # the run itself survives its worker's death
    else:
        before = set(_ram_read_caches())
        r = run_nnresume(raw_root, pp, *ARGS, expect=None, **env)
        assert r.returncode == -signal.SIGKILL, r.stderr
        left = set(_ram_read_caches()) - before
        if point == "fingerprint_aggregate" and _room_for_read_cache_in_ram():
            # every case fingerprinted, none preprocessed: the killed run's read cache is still in RAM
            assert len(left) == 1 and any(p.suffix == ".pkl" for p in next(iter(left)).iterdir()), left
        _assert_consistent(dataset)
        # whatever the crash left, the ledger vouches only for complete files
        v = run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json", expect=0)
        assert json.loads(v.stdout)["problems"] == []
        if point.startswith("fingerprint_aggregate"):
            assert not (dataset / "dataset_fingerprint.json").exists()
        run_nnresume(raw_root, pp, *ARGS)
        assert not any(p.exists() for p in left), "the rerun removes a killed run's read cache from RAM"
    _assert_consistent(dataset)
    assert compare_folders(dataset, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []
    v = run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json", expect=0)
    assert json.loads(v.stdout)["unvouched"] == []


def test_verify_finds_truncated_corrupted_and_deleted_outputs(raw_root: Path, references: References,
                                                             tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    dataset = pp / SMALL.folder_name
    run_nnresume(raw_root, pp, *ARGS)
    truncated = dataset / "nnUNetPlans_3d_fullres" / "small_0001.b2nd"
    flipped = dataset / "nnUNetPlans_2d" / "small_0004_seg.b2nd"
    deleted = dataset / "nnUNetPlans_2d" / "small_0006.pkl"
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    deleted.unlink()

    quick = json.loads(run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--json", expect=3).stdout)
    assert {(p["case"], p["where"]) for p in quick["problems"]} == {
        ("small_0001", "nnUNetPlans_3d_fullres"), ("small_0006", "nnUNetPlans_2d")}
    full = json.loads(run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json",
                                   expect=3).stdout)
    found = {(p["case"], p["where"]): p["problem"] for p in full["problems"]}
    assert "small_0004" in {c for c, _ in found} and "checksum" in found[("small_0004", "nnUNetPlans_2d")]
    # the next preprocess redoes exactly those three (case, configuration) pairs
    run_nnresume(raw_root, pp, *ARGS)
    last = ledger_query(dataset / "nnresume.sqlite", "select max(id) from runs")[0][0]
    redone = set(ledger_query(dataset / "nnresume.sqlite", "select c.name, o.data_identifier from outputs o join "
                                                           "cases c on c.id=o.case_id where o.run_id=?", (last,)))
    assert redone == {("small_0001", "nnUNetPlans_3d_fullres"), ("small_0004", "nnUNetPlans_2d"),
                      ("small_0006", "nnUNetPlans_2d")}
    assert compare_folders(dataset, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []
    run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", expect=0)


def test_second_run_refuses_while_one_runs_and_a_dead_runs_lock_is_taken_over(raw_root: Path,
                                                                           tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    dataset = pp / BIG.folder_name
    first = start_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "-np", "1", "--no-pbar", *BIG_ARGS)
    wait_for(lambda: (dataset / "nnresume.sqlite").exists() and ledger_query(
        dataset / "nnresume.sqlite", "select count(*) from runs")[0][0] > 0, timeout=120, proc=first)
    # status from another shell while it runs
    wait_for(lambda: ledger_query(dataset / "nnresume.sqlite", "select count(*) from attempts where outcome='ok' "
                                                               "and stage='preprocess'")[0][0] > 0,
             timeout=300, proc=first)
    live = json.loads(run_nnresume(raw_root, pp, "status", "-d", str(BIG.dataset_id), "--json").stdout)
    assert live["last_run"]["state"] == "running" and live["last_run"]["ended_at"] is None
    assert live["progress"]["remaining_cases"] > 0 and live["progress"]["eta_s"] is not None
    second = run_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "--no-pbar", *BIG_ARGS, expect=1)
    assert f"PID {first.pid}" in second.stderr and "host" in second.stderr and "since" in second.stderr
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    holder = json.loads((dataset / ".nnresume" / "lock").read_text())
    assert holder["pid"] == first.pid  # the dead run's lock file is still there...
    run_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "-np", "2", "--no-pbar", *BIG_ARGS)
    runs = ledger_query(dataset / "nnresume.sqlite", "select status from runs order by id")
    assert runs == [("interrupted",), ("completed",)]  # ...and was taken over


@pytest.mark.parametrize("sig, code, grace, to_group", [
    (signal.SIGTERM, 143, "120", False),  # a scheduler's time limit: running cases may finish
    (signal.SIGINT, 130, "0", True),  # Ctrl-C reaches the whole process group; no grace: stop them now
])
def test_signals_stop_cleanly_and_the_rerun_resumes(sig: int, code: int, grace: str, to_group: bool,
                                                    raw_root: Path, references: References, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    dataset = pp / BIG.folder_name
    ledger = dataset / "nnresume.sqlite"
    proc = start_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "-np", "2", "--no-pbar",
                          "--grace", grace, *BIG_ARGS)
    wait_for(lambda: ledger.exists() and ledger_query(
        ledger, "select count(*) from outputs where state='running' and data_identifier != 'gt_segmentations'"
    )[0][0] > 0, timeout=300, proc=proc)
    running = set(ledger_query(ledger, "select case_id, data_identifier from outputs where state='running'"))
    children = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out
    assert "run the same command again" in out.lower()
    assert "Traceback" not in out
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "orphaned processes"
    status, reason = ledger_query(ledger, "select status, end_reason from runs order by id desc limit 1")[0]
    assert status == "interrupted" and signal.Signals(sig).name in reason
    assert ledger_query(ledger, "select count(*) from outputs where state='running'")[0][0] == 0
    states = dict(((c, d), s) for c, d, s in ledger_query(ledger, "select case_id, data_identifier, state "
                                                                  "from outputs"))
    if grace != "0":
        assert all(states[k] == "done" for k in running), "running cases were not let finish"
    else:
        assert time.monotonic() - t0 < 30
    run_nnresume(raw_root, pp, "preprocess", "-d", str(BIG.dataset_id), "-np", "2", "--no-pbar", *BIG_ARGS)
    reference = references.get(BIG, tuple(BIG_ARGS))
    folders = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert compare_folders(dataset, reference, folders, ["nnUNetPlans.json"]) == []


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
        _assert_consistent(dataset)
        assert 4 <= done_outputs(ledger) < SMALL.num_cases * 3
        v = json.loads(run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--json",
                                    expect=0).stdout)
        assert v["problems"] == []
        run_nnresume(raw_root, pp, *ARGS)
        assert compare_folders(dataset, references.get(SMALL), FOLDERS, ["nnUNetPlans.json"]) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)])
