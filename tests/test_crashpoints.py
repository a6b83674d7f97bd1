"""The crash points' own rules (io/crashpoints.py), in milliseconds: which reach of which point by which case and
stage crashes, once or every time, several in one run. The crash tests rely on them to aim their kills."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nnresume.io import crashpoints


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NNRESUME_CRASH_AT", "NNRESUME_CRASH_CASE", "NNRESUME_CRASH_HOW", "NNRESUME_CRASH_ONCE"):
        monkeypatch.delenv(name, raising=False)
    crashpoints.start_task(None)


def test_nothing_set_nothing_happens() -> None:
    crashpoints.reached("staged")


def test_the_nth_reach_within_a_task_of_the_named_case_and_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNRESUME_CRASH_AT", "staged:2@c1/preprocess=memory")
    crashpoints.start_task("c1", "fingerprint")
    crashpoints.reached("staged")
    crashpoints.reached("staged")  # another stage: not this one
    crashpoints.start_task("c2", "preprocess")
    crashpoints.reached("staged")
    crashpoints.reached("staged")  # another case
    crashpoints.start_task("c1", "preprocess")
    crashpoints.reached("staged")
    crashpoints.reached("renamed")  # another point
    with pytest.raises(MemoryError):
        crashpoints.reached("staged")
    crashpoints.start_task("c1", "preprocess")  # each task counts from the start
    crashpoints.reached("staged")


def test_several_points_each_once_with_its_own_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    once = tmp_path / "once"
    monkeypatch.setenv("NNRESUME_CRASH_AT", "staged@a=memory, staged@b=memory*")
    monkeypatch.setenv("NNRESUME_CRASH_ONCE", str(once))
    for _ in range(2):
        crashpoints.start_task("a")
        try:
            crashpoints.reached("staged")
        except MemoryError:
            assert Path(f"{once}.0").read_text().isdigit(), "the file holds the crashing process's pid"
        else:
            assert Path(f"{once}.0").exists(), "a's spec crashes once"
    for _ in range(2):  # `*`: every time, NNRESUME_CRASH_ONCE notwithstanding
        crashpoints.start_task("b")
        with pytest.raises(MemoryError):
            crashpoints.reached("staged")
    assert not Path(f"{once}.1").exists()


def test_legacy_variables_still_say_the_case_and_the_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NNRESUME_CRASH_AT", "renamed:2")
    monkeypatch.setenv("NNRESUME_CRASH_CASE", "x")
    monkeypatch.setenv("NNRESUME_CRASH_HOW", "memory")
    monkeypatch.setenv("NNRESUME_CRASH_ONCE", str(tmp_path / "once"))
    crashpoints.set_case("x")
    crashpoints.reached("renamed")
    with pytest.raises(MemoryError):
        crashpoints.reached("renamed")
    assert (tmp_path / "once").exists(), "one spec: the file is the path itself"
    crashpoints.reached("renamed")


def test_a_pause_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNRESUME_CRASH_AT", "staged=pause:0.01")
    crashpoints.reached("staged")


@pytest.mark.parametrize("spec", ["nowhere", "staged=explode"])
def test_a_typo_is_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("NNRESUME_CRASH_AT", spec)
    with pytest.raises(ValueError, match="NNRESUME_CRASH_AT"):
        crashpoints.reached("staged")


def test_the_default_way_is_sigkill(tmp_path: Path) -> None:
    code = "from nnresume.io import crashpoints\ncrashpoints.start_task('a')\ncrashpoints.reached('staged')\n"
    r = subprocess.run([sys.executable, "-c", code], env={"NNRESUME_CRASH_AT": "staged@b=segv,staged@a",
                                                          "PATH": "/usr/bin:/bin"},
                       capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
