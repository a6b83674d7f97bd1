"""A real out-of-memory situation. In a child memory cgroup whose limit nnU-Net's `-np 2` exceeds, the kernel OOM-kills
one of nnU-Net's workers and its run fails; nnresume with `--max-ram` at the same limit completes, with no OOM kill, and
its outputs equal nnU-Net's unconstrained ones. Skipped where memory cgroups cannot be created.

The two cases are large (about 12 and 22 million voxels) so that two of them preprocessed at once, beside nnU-Net's
own processes, need more than 2400 MiB, while one at a time fits.

Prediction likewise: `nnUNetv2_predict` with its default `-npp 3 -nps 3` starts six background processes beside the
one holding the network, each importing torch; in a 1500 MiB cgroup the kernel OOM-kills them (measured: exit -9 after
4 OOM kills; at 2000 MiB it hung until killed after 600 s), while `nnresume predict` with its default budget (the
memory available in the cgroup minus a tenth) runs as many workers as fit beside its device process (peak 793-827 MiB
in the cgroup over five runs) and writes the same segmentations as nnU-Net's unconstrained run.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnresume.compare import compare_folders
from nnresume.synthetic import DemoSpec, make_dataset

from .conftest import NNUNET_TIMEOUT, env_for, nnunet_command, run_nnunet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib import MAKE_MODEL, can_make_memory_cgroup, run_in_fresh_cgroup  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.cgroup]

OOM = DemoSpec(dataset_id=950, name="Oom", num_cases=2, min_shape=(96, 352, 352), max_shape=(192, 352, 352),
               seed=1201)
LIMIT_MIB = 2400


@pytest.fixture(scope="module")
def oom_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not can_make_memory_cgroup():
        pytest.skip("cannot create a child memory cgroup here")
    raw = tmp_path_factory.mktemp("oom-raw")
    make_dataset(OOM, raw)
    return raw


def test_nnunet_is_oom_killed_and_nnresume_finishes_identically(oom_raw: Path, tmp_path: Path) -> None:
    limit = LIMIT_MIB << 20
    cmd = [nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(OOM.dataset_id), "-npfp", "2", "-np", "2",
           "--no_pbar"]
    nn = run_in_fresh_cgroup(limit, cmd, env_for(oom_raw, tmp_path / "nnunet"), timeout=600)
    assert nn.returncode != 0 and nn.oom_kills >= 1, (
        f"nnU-Net was expected to be OOM-killed at {LIMIT_MIB} MiB (exit {nn.returncode}, "
        f"{nn.oom_kills} OOM kills)\n{nn.output[-2000:]}")

    ours = run_in_fresh_cgroup(limit, [sys.executable, "-m", "nnresume", "preprocess", "-d", str(OOM.dataset_id),
                                       "-np", "2", "--max-ram", f"{LIMIT_MIB}M", "--no-pbar"],
                               env_for(oom_raw, tmp_path / "ours"), timeout=900)
    assert ours.returncode == 0, ours.output[-4000:]
    assert ours.oom_kills == 0, f"nnresume was OOM-killed {ours.oom_kills} time(s)"

    reference = tmp_path / "reference"
    run_nnunet(oom_raw, reference, OOM.dataset_id, [])
    ref = reference / OOM.folder_name
    folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    assert compare_folders(tmp_path / "ours" / OOM.folder_name, ref, folders, ["nnUNetPlans.json"]) == []


PREDICT = DemoSpec(dataset_id=952, name="PredOom", num_cases=3, min_shape=(24, 64, 64), max_shape=(32, 96, 96), seed=7)
PREDICT_LIMIT_MIB = 1500


def test_nnunet_predict_is_oom_killed_and_nnresume_predict_finishes_identically(tmp_path: Path) -> None:
    import SimpleITK as sitk

    if not can_make_memory_cgroup():
        pytest.skip("cannot create a child memory cgroup here")
    raw, preprocessed = tmp_path / "raw", tmp_path / "preprocessed"
    make_dataset(PREDICT, raw)
    env = env_for(raw, preprocessed)
    for cmd in ([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(PREDICT.dataset_id), "-c", "3d_fullres",
                 "--no_pp", "-npfp", "2"],
                [sys.executable, "-c", MAKE_MODEL, str(preprocessed), PREDICT.folder_name, "3d_fullres"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=NNUNET_TIMEOUT)
        assert r.returncode == 0, f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    inputs = raw / PREDICT.folder_name / "imagesTr"
    args = ["-i", str(inputs), "-d", str(PREDICT.dataset_id), "-c", "3d_fullres", "-f", "0", "-device", "cpu"]
    limit = PREDICT_LIMIT_MIB << 20

    nn = run_in_fresh_cgroup(limit, [nnunet_command("nnUNetv2_predict"), *args, "-o", str(tmp_path / "nnunet"),
                                     "--disable_progress_bar"], env, timeout=300)
    assert nn.returncode != 0 and nn.oom_kills >= 1, (
        f"nnUNetv2_predict was expected to be OOM-killed at {PREDICT_LIMIT_MIB} MiB (exit {nn.returncode}, "
        f"{nn.oom_kills} OOM kills)\n{nn.output[-2000:]}")

    # no --max-ram: the default budget must hold inside a job's own cgroup (a SLURM job's --mem)
    ours = run_in_fresh_cgroup(limit, [sys.executable, "-m", "nnresume", "predict", *args, "-o", str(tmp_path / "ours"),
                                       "--no-pbar"], env, timeout=600)
    assert ours.returncode == 0, ours.output[-4000:]
    assert ours.oom_kills == 0, f"nnresume predict was OOM-killed {ours.oom_kills} time(s)"
    print(f"nnresume predict: peak {(ours.max_usage or 0) >> 20} MiB in the {PREDICT_LIMIT_MIB} MiB cgroup")

    reference = tmp_path / "reference"
    r = subprocess.run([nnunet_command("nnUNetv2_predict"), *args, "-o", str(reference), "-npp", "1", "-nps", "1",
                        "--disable_progress_bar"], env=env, capture_output=True, text=True, timeout=NNUNET_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert len(names) == PREDICT.num_cases
    for name in names:
        a, b = sitk.ReadImage(str(tmp_path / "ours" / name)), sitk.ReadImage(str(reference / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
