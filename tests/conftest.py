"""Shared fixtures: small synthetic datasets, and runners for nnU-Net's command and ours as real subprocesses.

nnU-Net's reference outputs are computed once per session per (dataset, arguments) and shared by the tests.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from nnresume.synthetic import DemoSpec, make_dataset

SMALL = DemoSpec(dataset_id=901, name="Small", num_cases=8, seed=11)
MULTI = DemoSpec(dataset_id=902, name="Multi", num_cases=6, channels=("CT", "T2"), seed=12)
BIG = DemoSpec(dataset_id=903, name="Big", num_cases=5, min_shape=(48, 128, 128), max_shape=(64, 160, 160), seed=2)
# with this GPU memory target the planner makes 3d_lowres and 3d_cascade_fullres for BIG
BIG_ARGS = ["-gpu_memory_target", "0.3"]

NNUNET_TIMEOUT = 900


def env_for(raw: Path, preprocessed: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
                "nnUNet_results": str(preprocessed.parent / "results"), "PYTHONUNBUFFERED": "1"})
    env.pop("NNRESUME_CRASH_AT", None)
    env.update(extra)
    return env


def nnunet_command(name: str) -> str:
    """nnU-Net's console script installed beside this interpreter: tests run from a virtualenv that is not
    activated (its bin/ is not on PATH) find it there."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def run_nnunet(raw: Path, preprocessed: Path, dataset_id: int, args: list[str]) -> None:
    preprocessed.mkdir(parents=True, exist_ok=True)
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-npfp", "2", "-np", "2",
           "--no_pbar", *args]
    r = subprocess.run(cmd, env=env_for(raw, preprocessed), capture_output=True, text=True, timeout=NNUNET_TIMEOUT)
    assert r.returncode == 0, f"nnU-Net failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


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


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for spec in (SMALL, MULTI, BIG):
        make_dataset(spec, root)
    return root


class References:
    """nnU-Net's own outputs, computed on first use and kept for the session."""

    def __init__(self, root: Path, raw: Path) -> None:
        self.root, self.raw = root, raw
        self._done: dict[tuple, Path] = {}

    def get(self, spec: DemoSpec, args: tuple[str, ...] = ()) -> Path:
        key = (spec.dataset_id, args)
        if key not in self._done:
            pp = self.root / f"ref-{spec.dataset_id}-{len(self._done)}"
            run_nnunet(self.raw, pp, spec.dataset_id, list(args))
            self._done[key] = pp / spec.folder_name
        return self._done[key]


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory, raw_root: Path) -> References:
    return References(tmp_path_factory.mktemp("references"), raw_root)


def copy_dataset(raw_root: Path, spec: DemoSpec, dest_root: Path) -> Path:
    """A private copy of a raw dataset, for tests that change inputs."""
    dest = dest_root / spec.folder_name
    shutil.copytree(raw_root / spec.folder_name, dest)
    return dest_root
