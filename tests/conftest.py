"""Shared fixtures: small synthetic datasets, nnU-Net's reference runs (tests/references.py), a finished nnresume run
to start from, and runners for our command as real subprocesses.

What costs time here is starting processes that import nnunetv2 (about 4 s of CPU each) and nnU-Net's fingerprint
(10e7 intensity samples per channel, whatever the number of cases): each is paid once per session where it can be.
- `references`: nnU-Net's own outputs, computed once per session in a background lane (see tests/references.py).
- `finished_small`: SMALL preprocessed by nnresume once per session, put back in place (the same paths, the same file
  times, so the ledger's record of the inputs holds) before each test that uses it, which may then change anything.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from nnresume.synthetic import DemoSpec, make_dataset

from .references import (
    NNUNET_TIMEOUT,
    Lane,
    References,
    env_for,
    job,
    nnunet_command,
    plan_and_preprocess,
)

__all__ = ["NNUNET_TIMEOUT", "env_for", "nnunet_command"]

SMALL = DemoSpec(dataset_id=901, name="Small", num_cases=8, seed=11)
MULTI = DemoSpec(dataset_id=902, name="Multi", num_cases=6, channels=("CT", "T2"), seed=12)
# small enough to preprocess in seconds; with this GPU memory target the planner makes 3d_lowres and
# 3d_cascade_fullres for it
LOWRES = DemoSpec(dataset_id=903, name="Lowres", num_cases=4, min_shape=(24, 64, 64), max_shape=(32, 80, 80), seed=2)
LOWRES_ARGS = ["-gpu_memory_target", "0.05"]
SMALL_FOLDERS = ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"]


# ---- running nnresume ------------------------------------------------------------------------------------------

def nnresume_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnresume", *args]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_nnresume(raw: Path, preprocessed: Path, *args: str, expect: Optional[int] = 0, timeout: float = 900,
                 **env: str) -> Result:
    preprocessed.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(nnresume_cmd(*args), env=env_for(raw, preprocessed, **env), capture_output=True, text=True,
                       timeout=timeout)
    if expect is not None:
        assert r.returncode == expect, (f"nnresume {' '.join(args)} exited {r.returncode}, expected {expect}:\n"
                                        f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return Result(r.returncode, r.stdout, r.stderr)


def start_nnresume(raw: Path, preprocessed: Path, *args: str, **env: str) -> subprocess.Popen:
    preprocessed.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(nnresume_cmd(*args), env=env_for(raw, preprocessed, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_nnunet(raw: Path, preprocessed: Path, dataset_id: int, args: list[str]) -> None:
    """nnU-Net's command in the test's own thread, for a reference made from data the test itself changed."""
    plan_and_preprocess(Lane(), raw, preprocessed, [dataset_id], *args)


def ledger_query(ledger: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def wait_for(predicate: Callable[[], bool], timeout: float, proc: Optional[subprocess.Popen] = None,
             interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except sqlite3.OperationalError:
            pass
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (exit {proc.returncode}) before the condition was met:\n{out}")
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def done_outputs(ledger: Path) -> int:
    return ledger_query(ledger, "select count(*) from outputs where state='done'")[0][0]


def copy_dataset(raw_root: Path, spec: DemoSpec, dest_root: Path) -> Path:
    """A private copy of a raw dataset, for tests that change inputs."""
    dest = dest_root / spec.folder_name
    shutil.copytree(raw_root / spec.folder_name, dest)
    return dest_root


def last_run(ledger: Path) -> int:
    return ledger_query(ledger, "select max(id) from runs")[0][0]


def redone(ledger: Path, run_id: int) -> set[tuple[str, str]]:
    """(case, data folder) pairs the given run committed."""
    return set(ledger_query(ledger, "select c.name, o.data_identifier from outputs o join cases c on c.id=o.case_id "
                                    "where o.run_id=?", (run_id,)))


# ---- nnU-Net's references --------------------------------------------------------------------------------------

_raw_lock = threading.Lock()
_raw: dict[str, Path] = {}


def shared_raw(references: References) -> Path:
    """SMALL, MULTI and LOWRES, written once per session (by whichever thread needs them first). Tests that change
    inputs work on a copy (copy_dataset)."""
    with _raw_lock:
        if "root" not in _raw:
            root = references.root / "raw"
            for spec in (SMALL, MULTI, LOWRES):
                make_dataset(spec, root)
            _raw["root"] = root
        return _raw["root"]


def _shared_dataset(spec: DemoSpec, *args: str) -> Callable[[References, Path, Lane], Path]:
    def make(references: References, folder: Path, lane: Lane) -> Path:
        plan_and_preprocess(lane, shared_raw(references), folder / "pp", [spec.dataset_id], *args)
        return folder / "pp" / spec.folder_name
    return make


def _from_small_fingerprint(*args: str) -> Callable[[References, Path, Lane], Path]:
    """nnU-Net's command on SMALL with other planning arguments, started from the fingerprint nnU-Net wrote for SMALL
    (nnU-Net reuses a dataset_fingerprint.json it finds, as it would in the user's folder)."""
    def make(references: References, folder: Path, lane: Lane) -> Path:
        dataset = folder / "pp" / SMALL.folder_name
        dataset.mkdir(parents=True)
        shutil.copy(references.get("small") / "dataset_fingerprint.json", dataset)
        plan_and_preprocess(lane, shared_raw(references), folder / "pp", [SMALL.dataset_id], *args)
        return dataset
    return make


def _small_with_edited_plans(references: References, folder: Path, lane: Lane) -> Path:
    """nnUNetv2_preprocess -c 3d_fullres with SMALL's plans after a hand edit of 3d_fullres's spacing."""
    import json

    pp = folder / "pp"
    shutil.copytree(references.get("small"), pp / SMALL.folder_name,
                    ignore=shutil.ignore_patterns("nnUNetPlans_*", "gt_segmentations"))
    plans_file = pp / SMALL.folder_name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = EDITED_SPACING
    plans_file.write_text(json.dumps(plans, indent=4))
    lane.run([nnunet_command("nnUNetv2_preprocess"), "-d", str(SMALL.dataset_id), "-c", "3d_fullres", "-np", "1",
              "--no_pbar"], env_for(shared_raw(references), pp))
    return pp / SMALL.folder_name


EDITED_SPACING = [2.5, 0.9, 0.9]

job("small", _shared_dataset(SMALL))
job("multi", _shared_dataset(MULTI), cost=35)
job("lowres", _shared_dataset(LOWRES, *LOWRES_ARGS), cost=28)
job("small-resenc", _from_small_fingerprint("-pl", "nnUNetPlannerResEncM"), requires=("small",), cost=14)
job("small-coarse", _from_small_fingerprint("-overwrite_target_spacing", "2", "1.5", "1.5", "-overwrite_plans_name",
                                            "nnUNetPlansCoarse", "-c", "3d_fullres"), requires=("small",), cost=10)
job("small-plans-edited", _small_with_edited_plans, requires=("small",), cost=10)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "references(*keys): nnU-Net references the test reads (tests/references.py)")


@pytest.fixture(scope="session", autouse=True)
def references(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[References]:
    """nnU-Net's references; the ones the selected slow tests name in their `references` marks start at once (the
    fast tests run no nnU-Net)."""
    refs = References(tmp_path_factory.mktemp("references"))
    keys = [k for item in request.session.items if item.get_closest_marker("slow")
            for m in item.iter_markers("references") for k in m.args]
    refs.prefetch(keys)
    yield refs
    refs.stop()


@pytest.fixture(scope="session")
def raw_root(references: References) -> Path:
    return shared_raw(references)


# ---- a finished nnresume run of SMALL ---------------------------------------------------------------------------

@dataclass
class Workspace:
    raw: Path  # holds SMALL's raw dataset (a copy of it: tests may change it)
    pp: Path  # nnUNet_preprocessed, with SMALL preprocessed by nnresume
    first_run: Result  # the run that preprocessed it (with progress bars)

    @property
    def dataset(self) -> Path:
        return self.pp / SMALL.folder_name

    @property
    def ledger(self) -> Path:
        return self.dataset / "nnresume.sqlite"


@pytest.fixture(scope="session")
def _small_snapshot(tmp_path_factory: pytest.TempPathFactory, raw_root: Path) -> tuple[Path, Path, Result]:
    work = tmp_path_factory.mktemp("small-work")
    copy_dataset(raw_root, SMALL, work / "raw")
    first = run_nnresume(work / "raw", work / "pp", "preprocess", "-d", str(SMALL.dataset_id), "-np", "2")
    snapshot = tmp_path_factory.mktemp("small-snapshot") / "work"
    shutil.copytree(work, snapshot, symlinks=True)
    return work, snapshot, first


@pytest.fixture
def finished_small(_small_snapshot: tuple[Path, Path, Result]) -> Workspace:
    """SMALL preprocessed by nnresume, fresh for this test at the paths it was made at."""
    work, snapshot, first = _small_snapshot
    shutil.rmtree(work)
    shutil.copytree(snapshot, work, symlinks=True)
    return Workspace(work / "raw", work / "pp", first)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from . import references as module

    refs = module.last
    if refs is None:
        return
    rows = refs.timings()
    if rows:
        terminalreporter.write_sep("-", "nnU-Net references (computed once; most in the background lane)")
        for key, state, seconds in sorted(rows, key=lambda r: -r[2]):
            terminalreporter.write_line(f"{seconds:8.1f}s {state:6s} {key}")
