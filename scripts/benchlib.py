"""Measuring a command the same way for nnU-Net and for nnresume: wall time, CPU time and peak memory of its whole
process tree; and child memory cgroups for real out-of-memory situations.

- CPU: a cgroup v1 cpuacct group counts every process that ever ran in it, exited ones included; where no such group
  can be made, CPU is summed from samples of the live processes (which misses the last moments of each).
- Memory: the command runs in its own session; all processes of the session are sampled: the sum of their RSS every
  0.1 s (as `ps` shows it: pages shared between processes count once per process) and the sum of their PSS every
  0.5 s (each page counted once, split among the processes sharing it). Both peaks are reported.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from nnresume.execution.system import memory_cgroup_path


def nnunet_command(name: str) -> str:
    """nnU-Net's console script beside this interpreter (a virtualenv need not be activated), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)

CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@dataclass
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float
    cpu_source: str
    peak_rss_sum: int
    peak_pss_sum: int
    stderr_tail: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, sum RSS)


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def _make_cpu_group() -> Optional[Path]:
    if os.environ.get("NNRESUME_BENCH_NO_CGROUP"):
        return None
    group = CPUACCT / f"nnresume-bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        return group
    except OSError:
        return None


def run_measured(cmd: list[str], env: dict[str, str], timeout: float = 7200,
                 extra_cgroup_procs: Optional[list[Path]] = None) -> Measured:
    """Runs `cmd` in a new session, optionally also inside other cgroups (their cgroup.procs files)."""
    group = _make_cpu_group()
    targets = [p for p in [group / "cgroup.procs" if group else None, *(extra_cgroup_procs or [])] if p]
    wrapped = cmd
    if targets:
        joins = " && ".join(f'echo $$ > "{t}"' for t in targets)
        wrapped = ["sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]
    t0 = time.monotonic()
    proc = subprocess.Popen(wrapped, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    peak_rss = peak_pss = 0
    cpu_seen: dict[int, float] = {}
    samples: list[tuple[float, int]] = []
    stderr_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)  # type: ignore
    reader.start()
    last_pss = 0.0
    while proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, 9)
            break
        procs = session_processes(proc.pid)
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                ct = p.cpu_times()
                cpu_seen[p.pid] = ct.user + ct.system
            except psutil.Error:
                pass
        peak_rss = max(peak_rss, rss)
        samples.append((time.monotonic() - t0, rss))
        if time.monotonic() - last_pss > 0.5:
            last_pss = time.monotonic()
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except psutil.Error:
                    pass
            peak_pss = max(peak_pss, pss)
        time.sleep(0.1)
    proc.wait()
    wall = time.monotonic() - t0
    reader.join(timeout=10)
    if group is not None:
        cpu = int((group / "cpuacct.usage").read_text()) / 1e9
        source = "cgroup cpuacct"
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    else:
        cpu, source = sum(cpu_seen.values()), "sampled"
    return Measured(proc.returncode, wall, cpu, source, peak_rss, peak_pss, "".join(stderr_chunks)[-3000:],
                    samples)


def interpreter_startup(runs: int = 5) -> float:
    """Median seconds for `python -c pass`: the floor under any Python command."""
    import statistics
    import sys

    times = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - t)
    return statistics.median(times)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- child memory cgroups --------------------------------------------------------------------------------------
# A child of this process's own memory cgroup gets a limit; a command started inside it is OOM-killed by the kernel
# when the group exceeds the limit, and nothing outside the group is touched. cgroup v1 (memory.limit_in_bytes,
# memory.oom_control) and v2 (memory.max, memory.events).

@dataclass
class CgroupRun:
    returncode: int
    wall_s: float
    oom_kills: int
    max_usage: Optional[int]
    output: str


class MemoryCgroup:
    def __init__(self, limit_bytes: int) -> None:
        found = memory_cgroup_path()
        if found is None:
            raise OSError("no memory cgroup")
        self.version, parent = found
        self.path = parent / f"nnresume-test-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        try:
            (self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).write_text(str(limit_bytes))
            if self.version == 1 and (self.path / "memory.memsw.limit_in_bytes").exists():
                try:
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                except OSError:
                    pass
        except OSError:
            self.remove()
            raise

    def oom_kills(self) -> int:
        name, key = ("memory.oom_control", "oom_kill") if self.version == 1 else ("memory.events", "oom_kill")
        try:
            for line in (self.path / name).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except OSError:
            pass
        return 0

    def max_usage(self) -> Optional[int]:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside this cgroup."""
        return ["sh", "-c", f'echo $$ > "{self.path / "cgroup.procs"}" && exec "$@"', "sh", *cmd]

    def run(self, cmd: list[str], env: dict[str, str], timeout: float = 900) -> CgroupRun:
        """Runs `cmd` in this cgroup. Its output goes through a file: a process it leaves behind (a pool worker
        orphaned by the OOM killer) would hold a pipe open and make reading it wait for that process."""
        before = self.oom_kills()
        wrapped = self.wrap(cmd)
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                code = -1
                log.write(f"\ntimed out after {timeout} s")
            log.seek(0)
            out = log.read()
        wall = time.monotonic() - t0
        self.wait_empty()
        return CgroupRun(code, wall, self.oom_kills() - before, self.max_usage(), out)

    def wait_empty(self, timeout: float = 30) -> None:
        """Waits until no process is left in the cgroup, killing what is still there after half the time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs = (self.path / "cgroup.procs").read_text().split()
            if not procs:
                return
            if time.monotonic() > deadline - timeout / 2:
                for pid in procs:
                    try:
                        os.kill(int(pid), 9)
                    except (ProcessLookupError, ValueError):
                        pass
            time.sleep(0.1)

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def can_make_memory_cgroup() -> bool:
    try:
        MemoryCgroup(1 << 30).remove()
        return True
    except OSError:
        return False


def run_in_fresh_cgroup(limit: int, cmd: list[str], env: dict[str, str], timeout: float = 900) -> CgroupRun:
    group = MemoryCgroup(limit)
    try:
        return group.run(cmd, env, timeout)
    finally:
        group.remove()


# A trained-model folder without training or download, for the prediction tests and benchmark: the checkpoint of an
# initialised nnUNetTrainer (random weights) for the plans in nnUNet_preprocessed, written where nnUNetv2_predict looks
# (nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/checkpoint_final.pth). Arguments:
# preprocessed folder, dataset folder name, configuration, [fold (0)], [small|full (small: fewer features per stage)].
MAKE_MODEL = """
import json, os, sys
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
preprocessed, dataset, config = sys.argv[1:4]
fold = int(sys.argv[4]) if len(sys.argv) > 4 else 0
small = (sys.argv[5] if len(sys.argv) > 5 else "small") == "small"
plans = json.load(open(os.path.join(preprocessed, dataset, "nnUNetPlans.json")))
dataset_json = json.load(open(os.path.join(preprocessed, dataset, "dataset.json")))
if small:  # fewer features per stage: CPU inference takes seconds
    kwargs = plans["configurations"][config]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(4 * 2 ** i, 16) for i in range(len(kwargs["features_per_stage"]))]
# initialize() infers the dataset class from the preprocessed folder's file endings; no data is read
data = os.path.join(preprocessed, dataset, plans["configurations"][config]["data_identifier"])
os.makedirs(data, exist_ok=True)
open(os.path.join(data, "placeholder.b2nd"), "wb").close()
trainer = nnUNetTrainer(dict(plans, continue_training=False), config, fold, dataset_json, device=torch.device("cpu"))
trainer.initialize()
trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes: TTA is exercised
os.makedirs(trainer.output_folder, exist_ok=True)
for name, content in (("plans.json", plans), ("dataset.json", dataset_json)):
    with open(os.path.join(trainer.output_folder_base, name), "w") as f:
        json.dump(content, f, indent=4)
trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
"""
