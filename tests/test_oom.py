"""A real out-of-memory situation. In a child memory cgroup whose limit nnU-Net's `-np 2` exceeds, the kernel OOM-kills
one of nnU-Net's workers and its run fails; nnresume with `--max-ram` at the same limit completes, with no OOM kill, and
its outputs equal nnU-Net's unconstrained ones. Skipped where memory cgroups cannot be created.

The two cases are large (about 12 and 22 million voxels) so that two of them preprocessed at once, beside nnU-Net's
own processes, need more than 2400 MiB, while one at a time fits: size is the point here, which is why the
preprocessing test takes about a minute (nnresume preprocessing 34 million voxels in the cgroup).

Prediction likewise: `nnUNetv2_predict` with its default `-npp 3 -nps 3` starts six background processes beside the
one holding the network, each importing torch; in a 1500 MiB cgroup the kernel OOM-kills them, whatever the size of
the cases (measured on the prediction tests' small model: exit -9 after 4 OOM kills, three runs out of three; on
larger cases, at 2000 MiB, it hung until killed after 600 s), while `nnresume predict` with its default budget (the
memory available in the cgroup minus a tenth) runs as many workers as fit beside its device process (peak 564-576
MiB in the cgroup on that model, 782-814 MiB on three cases of up to 32x96x96) and writes the same segmentations as
nnU-Net's unconstrained run.

nnU-Net's runs, in the cgroup and unconstrained, are references (tests/references.py): they run in the background
lane while other tests run; the cgroup holds each to its limit whatever else the machine does.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import env_for, nnunet_command
from .models import CONFIG, SPEC, Model
from .references import Lane, References, job, plan_and_preprocess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib import CgroupRun, MemoryCgroup, can_make_memory_cgroup, run_in_fresh_cgroup  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cgroup]

OOM = DemoSpec(dataset_id=950, name="Oom", num_cases=2, min_shape=(96, 352, 352), max_shape=(192, 352, 352),
               seed=1201)
LIMIT_MIB = 2400
# 3d_fullres, where the larger case's peak is highest (1.8 GB) and where nnU-Net's run is OOM-killed; the 2d
# configuration would add a minute to each of the three runs and go through the same governor
CONFIGURATION = ("-c", "3d_fullres")


def in_cgroup(lane: Lane, limit: int, cmd: list[str], env: dict[str, str], timeout: float) -> CgroupRun:
    """`cmd` in a fresh memory cgroup of `limit` bytes, through the lane (stopped with the session)."""
    group = MemoryCgroup(limit)
    try:
        before = group.oom_kills()
        r = lane.run(group.wrap(cmd), env, check=False, timeout=timeout)
        group.wait_empty()
        return CgroupRun(r.returncode, 0.0, group.oom_kills() - before, group.max_usage(), r.stdout + r.stderr)
    finally:
        group.remove()


@dataclass
class OomRuns:
    raw: Path
    nnunet_in_cgroup: CgroupRun
    reference: Path


def _oom_raw(references: References, folder: Path, lane: Lane) -> Optional[Path]:
    if not can_make_memory_cgroup():
        return None
    make_dataset(OOM, folder)
    return folder


def _oom_nnunet(references: References, folder: Path, lane: Lane) -> Optional[CgroupRun]:
    raw = references.get("oom-raw")
    if raw is None:
        return None
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(OOM.dataset_id), "-npfp", "2", "-np", "2",
           "--no_pbar", *CONFIGURATION]
    return in_cgroup(lane, LIMIT_MIB << 20, cmd, env_for(raw, folder / "pp"), timeout=600)


def _oom_reference(references: References, folder: Path, lane: Lane) -> Optional[Path]:
    raw = references.get("oom-raw")
    if raw is None:
        return None
    plan_and_preprocess(lane, raw, folder / "pp", [OOM.dataset_id], *CONFIGURATION)
    return folder / "pp" / OOM.folder_name


job("oom-raw", _oom_raw, cost=4)
job("oom-nnunet-in-cgroup", _oom_nnunet, requires=("oom-raw",), cost=30)
job("oom-reference", _oom_reference, requires=("oom-raw",), cost=60)


@pytest.mark.references("oom-nnunet-in-cgroup", "oom-reference")
def test_nnunet_is_oom_killed_and_nnresume_finishes_identically(references: References, tmp_path: Path) -> None:
    raw = references.get("oom-raw")
    if raw is None:
        pytest.skip("cannot create a child memory cgroup here")
    nn = references.get("oom-nnunet-in-cgroup")
    assert nn.returncode != 0 and nn.oom_kills >= 1, (
        f"nnU-Net was expected to be OOM-killed at {LIMIT_MIB} MiB (exit {nn.returncode}, "
        f"{nn.oom_kills} OOM kills)\n{nn.output[-2000:]}")

    ours = run_in_fresh_cgroup(LIMIT_MIB << 20, [sys.executable, "-m", "nnresume", "preprocess", "-d",
                                                 str(OOM.dataset_id), "-np", "2", "--max-ram", f"{LIMIT_MIB}M",
                                                 "--no-pbar", *CONFIGURATION], env_for(raw, tmp_path / "ours"),
                               timeout=900)
    assert ours.returncode == 0, ours.output[-4000:]
    assert ours.oom_kills == 0, f"nnresume was OOM-killed {ours.oom_kills} time(s)"

    ref = references.get("oom-reference")
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    assert compare_folders(tmp_path / "ours" / OOM.folder_name, ref, folders, ["nnUNetPlans.json"]) == []


PREDICT_LIMIT_MIB = 1500


def _predict_args(m: Model) -> list[str]:
    return ["-i", str(m.inputs), "-d", str(SPEC.dataset_id), "-c", CONFIG, "-f", "0", "-device", "cpu"]


def _predict_nnunet(references: References, folder: Path, lane: Lane) -> Optional[CgroupRun]:
    """nnUNetv2_predict with its defaults (-npp 3 -nps 3) in the cgroup, on the prediction tests' model."""
    if not can_make_memory_cgroup():
        return None
    m = references.get("predict-model")
    cmd = [nnunet_command("nnUNetv2_predict"), *_predict_args(m), "-o", str(folder / "out"), "--disable_progress_bar"]
    return in_cgroup(lane, PREDICT_LIMIT_MIB << 20, cmd, m.env(), timeout=300)


job("predict-oom-nnunet-in-cgroup", _predict_nnunet, requires=("predict-model",), cost=20)


@pytest.mark.references("predict-model", "predict-oom-nnunet-in-cgroup")
def test_nnunet_predict_is_oom_killed_and_nnresume_predict_finishes_identically(references: References,
                                                                                tmp_path: Path) -> None:
    import SimpleITK as sitk

    if not can_make_memory_cgroup():
        pytest.skip("cannot create a child memory cgroup here")
    m = references.get("predict-model")
    nn = references.get("predict-oom-nnunet-in-cgroup")
    assert nn.returncode != 0 and nn.oom_kills >= 1, (
        f"nnUNetv2_predict was expected to be OOM-killed at {PREDICT_LIMIT_MIB} MiB (exit {nn.returncode}, "
        f"{nn.oom_kills} OOM kills)\n{nn.output[-2000:]}")

    # no --max-ram: the default budget must hold inside a job's own cgroup (a SLURM job's --mem)
    ours = run_in_fresh_cgroup(PREDICT_LIMIT_MIB << 20, [sys.executable, "-m", "nnresume", "predict",
                                                         *_predict_args(m), "-o", str(tmp_path / "ours"),
                                                         "--no-pbar"], m.env(), timeout=600)
    assert ours.returncode == 0, ours.output[-4000:]
    assert ours.oom_kills == 0, f"nnresume predict was OOM-killed {ours.oom_kills} time(s)"
    print(f"nnresume predict: peak {(ours.max_usage or 0) >> 20} MiB in the {PREDICT_LIMIT_MIB} MiB cgroup")

    names = sorted(p.name for p in m.reference.glob("*.nii.gz"))  # nnUNetv2_predict's, unconstrained
    assert len(names) == SPEC.num_cases
    for name in names:
        a, b = sitk.ReadImage(str(tmp_path / "ours" / name)), sitk.ReadImage(str(m.reference / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
