"""nnU-Net's own runs, the suite's references: each computed once per session, in a background lane, in the order the
tests will ask for them.

A test module registers what it needs at import (`job(key, ...)`: a function that prepares its data and runs
nnU-Net's commands as real subprocesses, and about how long it takes) and marks its tests with
`@pytest.mark.references(key, ...)`. When the session starts, the keys of the selected tests are queued, and one
background thread runs them one after another, the longest first (nnU-Net with one worker process, so that the other
core stays with the test that runs meanwhile; the tests need the short ones early and take them themselves, see
below). `references.get(key)` returns the job's result: at once if it is done; if it has not started yet, by
running it in the asking test's own thread; if it is running in the other lane, after running queued jobs in the
test's thread while it waits (so a second lane works on the queue whenever a test would otherwise wait). A job that
fails raises in every test that asks for it, with nnU-Net's output.

Why: nnU-Net's command costs 20-40 s of CPU per dataset (a spawned pool per step, each importing torch and
nnunetv2, and 10e7 intensity samples per channel), and the suite needs about thirty of them; the tests that compare
with them run nnresume, which leaves a core free most of the time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

NNUNET_TIMEOUT = 900


def nnunet_command(name: str) -> str:
    """nnU-Net's console script installed beside this interpreter: tests run from a virtualenv that is not
    activated (its bin/ is not on PATH) find it there."""
    import shutil

    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def env_for(raw: Path, preprocessed: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
                "nnUNet_results": str(preprocessed.parent / "results"), "PYTHONUNBUFFERED": "1"})
    for name in [k for k in env if k.startswith("NNRESUME_CRASH")]:
        env.pop(name)
    env.update(extra)
    return env


class Lane:
    """Runs a job's commands; the process running now can be stopped when the session ends.

    Output goes to a file, not a pipe: a process that nnU-Net's command leaves behind (a pool worker orphaned by
    the OOM killer) would hold a pipe open, and reading it to its end would wait for that process forever. Whatever
    the command leaves in its process group is killed when it ends.
    """

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.stopped = False

    def run(self, cmd: list[str], env: dict[str, str], check: bool = True,
            timeout: float = NNUNET_TIMEOUT) -> subprocess.CompletedProcess:
        if self.stopped:
            raise RuntimeError("the session is over")
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                err.write(f"\n(killed after {timeout} s)\n")
            finally:
                self.stop()
                self.proc.wait()
                returncode = self.proc.returncode
                self.proc = None
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
        if check and r.returncode != 0:
            raise AssertionError(f"{Path(cmd[0]).name} {' '.join(cmd[1:6])} ... exited {r.returncode}:\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def stop(self) -> None:
        """SIGKILL to the running command's whole process group (whatever of it is left)."""
        proc = self.proc
        if proc is not None:
            try:
                os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass
class Job:
    key: str
    make: Callable[[References, Path, Lane], Any]  # (the references, a folder of its own, the lane) -> the result
    requires: tuple[str, ...] = ()
    cost: float = 20.0  # seconds it takes, about: the background lane takes the longest first
    state: str = "queued"  # queued, running, done, failed
    result: Any = None
    error: str = ""
    seconds: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


JOBS: dict[str, Job] = {}
last: Optional[References] = None  # the session's, for the terminal summary


def job(key: str, make: Callable[[References, Path, Lane], Any], requires: tuple[str, ...] = (),
        cost: float = 20.0) -> None:
    """Registers a reference (at import of the test module that needs it)."""
    if key in JOBS and JOBS[key].make is not make:
        raise ValueError(f"reference {key!r} registered twice")
    JOBS.setdefault(key, Job(key, make, requires, cost))


class References:
    def __init__(self, root: Path) -> None:
        global last
        self.root = root
        last = self
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._lanes: list[Lane] = []
        self._thread: Optional[threading.Thread] = None

    def prefetch(self, keys: list[str]) -> None:
        """Starts the background lane on `keys`, in this order (each job's prerequisites before it)."""
        with self._lock:
            for key in keys:
                for k in (*self._job(key).requires, key):
                    if k not in self._queue:
                        self._queue.append(k)
        if self._queue and self._thread is None:
            self._thread = threading.Thread(target=self._background, name="nnunet-references", daemon=True)
            self._thread.start()

    def get(self, key: str) -> Any:
        j = self._job(key)
        for k in j.requires:
            self.get(k)
        with self._lock:
            mine = j.state == "queued"
            if mine:
                self._take(j)
        if mine:
            self._run(j)
        while not j.done.wait(0.2):
            # it runs in another lane: this test would only wait, so it takes a job from the queue meanwhile (the
            # shortest: the test waits for it too)
            other = self._take_next(longest=False)
            if other is not None:
                self._run(other)
        if j.state in ("failed", "stopped"):
            raise AssertionError(f"nnU-Net reference {key!r} failed:\n{j.error}")
        return j.result

    def stop(self) -> None:
        with self._lock:
            self._queue.clear()
            for lane in self._lanes:
                lane.stopped = True
                lane.stop()

    def timings(self) -> list[tuple[str, str, float]]:
        return [(j.key, j.state, j.seconds) for j in JOBS.values() if j.state != "queued"]

    def _job(self, key: str) -> Job:
        if key not in JOBS:
            raise KeyError(f"no nnU-Net reference {key!r} is registered (tests/references.py)")
        return JOBS[key]

    def _take(self, j: Job) -> None:
        j.state = "running"
        if j.key in self._queue:
            self._queue.remove(j.key)

    def _take_next(self, longest: bool = True) -> Optional[Job]:
        """The longest (or shortest) queued job whose prerequisites are done, taken; None if there is none. Ties go
        to the job the tests need first."""
        with self._lock:
            ready = [JOBS[k] for k in self._queue if all(JOBS[r].done.is_set() for r in JOBS[k].requires)]
            if not ready:
                return None
            j = max(ready, key=lambda j: j.cost) if longest else min(ready, key=lambda j: j.cost)
            self._take(j)
            return j

    def _background(self) -> None:
        while True:
            j = self._take_next()
            if j is None:
                with self._lock:
                    if not self._queue:
                        return
                time.sleep(0.2)  # a prerequisite runs in a test's thread
                continue
            self._run(j)

    def _run(self, j: Job) -> None:
        lane = Lane()
        with self._lock:
            self._lanes.append(lane)
        t0 = time.monotonic()
        try:
            folder = self.root / j.key
            folder.mkdir(parents=True, exist_ok=True)
            j.result = j.make(self, folder, lane)
            j.state = "done"
        except BaseException as e:  # reported to every test that asks for it
            j.state = "stopped" if lane.stopped else "failed"
            j.error = e.args[0] if isinstance(e, AssertionError) and e.args else traceback.format_exc()
        finally:
            j.seconds = time.monotonic() - t0
            with self._lock:
                self._lanes.remove(lane)
            j.done.set()


def plan_and_preprocess(lane: Lane, raw: Path, preprocessed: Path, dataset_ids: list[int], *args: str,
                        check: bool = True) -> subprocess.CompletedProcess:
    """`nnUNetv2_plan_and_preprocess` with one worker process per step (the outputs do not depend on it)."""
    preprocessed.mkdir(parents=True, exist_ok=True)
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", *map(str, dataset_ids), "-npfp", "1", "-np", "1",
           "--no_pbar", *args]
    return lane.run(cmd, env_for(raw, preprocessed), check=check)
