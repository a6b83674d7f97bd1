"""The Dask back end on a real cluster: a `dask scheduler` and two `dask worker` processes on localhost, started as
a user would start them. Outputs identical to nnU-Net's; a Dask worker SIGKILLed mid-case is a death in the ledger and
the case reruns; a coordinator SIGKILLed mid-run resumes; a case too large for every worker fails with a message
instead of waiting forever; a scheduler gone mid-run is a clear error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnresume.compare import compare_folders
from nnresume.errors import EXIT_CASES_FAILED

from .conftest import (
    SMALL,
    References,
    copy_dataset,
    kill_group,
    last_run,
    ledger_query,
    run_nnresume,
    start_nnresume,
    wait_for,
)

pytest.importorskip("distributed")
pytestmark = pytest.mark.references("small")

FOLDERS = ["nnUNetPlans_2d", "nnUNetPlans_3d_fullres", "gt_segmentations"]
WORKER_MEMORY = 3 * 10**9


def dask_command() -> str:
    beside = Path(sys.executable).parent / "dask"
    return str(beside) if beside.exists() else "dask"


@dataclass
class Cluster:
    scheduler_file: Path
    processes: list[subprocess.Popen]

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def stop(self) -> None:
        for p in reversed(self.processes):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def start_cluster(folder: Path, workers: int = 2, memory: int = WORKER_MEMORY) -> Cluster:
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    log = open(folder / "cluster.log", "a")
    procs = [subprocess.Popen([dask_command(), "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file",
                               str(scheduler_file)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    cluster = Cluster(scheduler_file, procs)
    try:
        wait_for(scheduler_file.exists, timeout=60, proc=procs[0])
        for i in range(workers):
            procs.append(subprocess.Popen(
                [dask_command(), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--resources", f"MEMORY={memory}", "--memory-limit", str(memory + 10**9), "--no-dashboard",
                 "--name", f"w{i}", "--local-directory", str(folder / f"w{i}")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def test_the_cli_imports_distributed_only_for_a_cluster_run() -> None:
    """`distributed` costs ~1 s to import; the back end imports it when a run asks for a cluster, never the CLI, and
    the back end's module itself imports neither distributed nor nnunetv2."""
    code = ("import sys\nimport nnresume.cli, nnresume.execution.pools.dask\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'nnunetv2', 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


class Clusters:
    """The module's cluster, started once and again only if a test killed its scheduler."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.started, self.current = folder, 0, None

    def get(self) -> Cluster:
        if self.current is None or self.current.processes[0].poll() is not None:
            if self.current is not None:
                self.current.stop()
            self.started += 1
            self.current = start_cluster(self.folder / f"cluster-{self.started}")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    c = Clusters(tmp_path_factory.mktemp("dask"))
    yield c
    c.stop()


@pytest.fixture
def cluster(clusters: Clusters) -> Cluster:
    return clusters.get()


def args(cluster: Cluster) -> tuple[str, ...]:
    return ("preprocess", "-d", str(SMALL.dataset_id), "--no-pbar", "--scheduler-address", cluster.address)


def _busy_worker_pid(cluster: Cluster) -> int:
    """The pid of a Dask worker process (the nanny's child) running a preprocess case."""
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        found: dict[str, int] = {}

        def busy() -> bool:
            for address, keys in client.processing().items():
                if keys:
                    found["pid"] = client.run(os.getpid, workers=[address])[address]
                    return True
            return False

        wait_for(busy, timeout=120, interval=0.02)
        return found["pid"]


@pytest.mark.slow
def test_dask_worker_killed_mid_case(cluster: Cluster, raw_root: Path, references: References,
                                     tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    proc = start_nnresume(raw_root, pp, *args(cluster))
    try:
        wait_for(lambda: ledger.exists() and ledger_query(
            ledger, "select count(*) from outputs where state='running' and data_identifier like 'nnUNetPlans_%'"
        )[0][0] > 0, timeout=300, proc=proc, interval=0.02)
        os.kill(_busy_worker_pid(cluster), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, out
    died = ledger_query(ledger, "select case_name, stage, message from attempts where outcome='died'")
    assert len(died) >= 1, out
    assert all("lost with its Dask worker" in m or "SIGKILL" in m for _, _, m in died), died
    assert "retrying" in out
    assert compare_folders(pp / SMALL.folder_name, references.get("small"), FOLDERS, ["nnUNetPlans.json"]) == []
    # the nanny restarted the worker: the cluster is whole again for the next tests
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        client.wait_for_workers(2, timeout=120)


@pytest.mark.slow
def test_coordinator_killed_then_rerun_identical_to_nnunet(cluster: Cluster, raw_root: Path,
                                                           references: References, tmp_path: Path) -> None:
    pp = tmp_path / "pp"
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    proc = start_nnresume(raw_root, pp, *args(cluster))
    try:
        wait_for(lambda: ledger.exists() and ledger_query(
            ledger, "select count(*) from outputs where state='done' and data_identifier like 'nnUNetPlans_%'"
        )[0][0] >= 2, timeout=300, proc=proc, interval=0.02)
    finally:
        kill_group(proc)
    r = run_nnresume(raw_root, pp, *args(cluster))
    assert "completed" in r.stderr
    assert "Dask cluster at" in r.stderr and "2 thread(s)" in r.stderr
    assert compare_folders(pp / SMALL.folder_name, references.get("small"), FOLDERS, ["nnUNetPlans.json"]) == []
    assert ledger_query(ledger, "select count(*) from attempts where outcome != 'ok' and run_id=?",
                        (last_run(ledger),))[0][0] == 0
    status = json.loads(run_nnresume(raw_root, pp, "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    for ident in FOLDERS:
        assert status["stages"][ident]["counts"]["done"] == SMALL.num_cases
    verify = run_nnresume(raw_root, pp, "verify", "-d", str(SMALL.dataset_id), "--full", "--no-pbar")
    assert verify.returncode == 0


def _write_huge_case(dataset: Path, case: str) -> None:
    """A case of 135 million voxels of zeros (a few hundred KB compressed): its fingerprint's estimate from the
    header alone exceeds every worker's MEMORY resource, so nothing ever reads its pixels."""
    import numpy as np
    import SimpleITK as sitk

    for path in (dataset / "imagesTr" / f"{case}_0000.nii.gz", dataset / "labelsTr" / f"{case}.nii.gz"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((260, 720, 720), np.uint8)), str(path), useCompression=True)


@pytest.mark.slow
def test_case_larger_than_every_worker_fails_clearly(cluster: Cluster, raw_root: Path, tmp_path: Path) -> None:
    raw = copy_dataset(raw_root, SMALL, tmp_path / "raw")
    _write_huge_case(raw / SMALL.folder_name, "small_0003")
    t0 = time.monotonic()
    r = run_nnresume(raw, tmp_path / "pp", "preprocess", "-d", str(SMALL.dataset_id), "--no-pbar",
                     "--scheduler-file", str(cluster.scheduler_file), expect=EXIT_CASES_FAILED, timeout=300)
    assert time.monotonic() - t0 < 240
    assert "case small_0003 (fingerprint): estimated peak memory" in r.stderr, r.stderr
    assert "exceeds the MEMORY resource of every Dask worker" in r.stderr and "--resources MEMORY=" in r.stderr
    status = json.loads(run_nnresume(raw, tmp_path / "pp", "status", "-d", str(SMALL.dataset_id), "--json").stdout)
    assert status["stages"]["fingerprint"]["counts"]["done"] == SMALL.num_cases - 1
    for ident in FOLDERS:
        assert status["stages"][ident]["counts"]["done"] == SMALL.num_cases - 1


@pytest.mark.slow
def test_scheduler_gone_is_a_clear_error(cluster: Cluster, raw_root: Path, tmp_path: Path) -> None:
    """The module's cluster's scheduler is killed: a later test gets a new cluster (Clusters.get)."""
    doomed = cluster
    pp = tmp_path / "pp"
    ledger = pp / SMALL.folder_name / "nnresume.sqlite"
    try:
        proc = start_nnresume(raw_root, pp, "preprocess", "-d", str(SMALL.dataset_id), "--no-pbar",
                              "--scheduler-file", str(doomed.scheduler_file))
        try:
            wait_for(lambda: ledger.exists() and ledger_query(
                ledger, "select count(*) from outputs where state='running'")[0][0] > 0, timeout=300, proc=proc,
                interval=0.02)
            os.killpg(doomed.processes[0].pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    finally:
        doomed.stop()
    assert proc.returncode == 1, out
    assert "the Dask scheduler at" in out and "is gone" in out
    assert "Traceback" not in out
    (status,) = ledger_query(ledger, "select status from runs")
    assert status[0] == "failed"
