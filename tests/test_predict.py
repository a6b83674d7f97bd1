"""`nnresume predict` against `nnUNetv2_predict`, on a model made in the test session without any download
(tests/models.py)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from nnresume.predict.cases import list_input_cases
from nnresume.synthetic import case_name

from .conftest import References, kill_group, ledger_query, run_nnresume, start_nnresume
from .models import CONFIG, SPEC, Model

ARGS = ("-d", str(SPEC.dataset_id), "-c", CONFIG, "-f", "0", "-device", "cpu")
pytestmark = pytest.mark.references("predict-model", "predict-2d", "predict-ensemble")


@pytest.fixture
def model(references: References) -> Model:
    return references.get("predict-model")


@pytest.fixture
def model_2d(references: References) -> Path:
    return references.get("predict-2d")


@pytest.fixture
def two_folds(references: References) -> Path:
    return references.get("predict-ensemble")


def copy_inputs(m: Model, dest: Path) -> Path:
    shutil.copytree(m.inputs, dest)
    return dest


def predict(m: Model, inputs: Path, out: Path, *extra: str, expect: int = 0, **env: str) -> str:
    r = run_nnresume(m.raw, m.preprocessed, "predict", "-i", str(inputs), "-o", str(out), *ARGS, "--no-pbar",
                     *extra, expect=expect, **env)
    return r.stdout + r.stderr


def assert_same_predictions(ours: Path, reference: Path, cases: list[str], probabilities: bool) -> None:
    """Decoded voxels, spacing, origin and direction of each segmentation; with probabilities, the arrays of the
    .npz and the properties of the .pkl."""
    import SimpleITK as sitk

    for case in cases:
        a, b = sitk.ReadImage(str(ours / f"{case}.nii.gz")), sitk.ReadImage(str(reference / f"{case}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), case
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
        if probabilities:
            pa, pb = np.load(ours / f"{case}.npz")["probabilities"], np.load(reference / f"{case}.npz")["probabilities"]
            assert pa.dtype == pb.dtype and np.array_equal(pa, pb), case
            with open(ours / f"{case}.pkl", "rb") as fa, open(reference / f"{case}.pkl", "rb") as fb:
                assert repr(pickle.load(fa)) == repr(pickle.load(fb)), case


def _gone_within(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def cases() -> list[str]:
    return [case_name(SPEC, i) for i in range(SPEC.num_cases)]


def done_rows(out: Path) -> dict[str, int]:
    """case -> run id of its done prediction row."""
    return dict(ledger_query(out / "nnresume.sqlite",
                             "select c.name, o.run_id from outputs o join cases c on c.id = o.case_id "
                             "where o.data_identifier='prediction' and o.state='done'"))


@pytest.mark.slow
def test_predictions_identical_to_nnunet(model: Model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = predict(model, model.inputs, out, "--save_probabilities", "-npp", "2")
    assert "leaked" not in text, text  # nothing of the device process is left to the resource tracker
    assert_same_predictions(out, model.reference, cases(), probabilities=True)
    assert sorted(done_rows(out)) == cases()
    for name in ("plans.json", "dataset.json"):  # as nnUNetv2_predict leaves them beside the predictions
        assert (out / name).is_file()
    assert not any((out / ".nnresume" / "staging").glob("*/*"))


@pytest.mark.slow
def test_kill_resume_and_reruns(model: Model, tmp_path: Path) -> None:
    """A SIGKILL mid-prediction, the resume, and what a rerun redoes (nothing; nothing after a touch; a changed input
    and a cut-short output; every case for a changed model key) in one chain on one output folder. About a minute:
    nine real runs of the CLI, of which each that predicts starts a device process importing torch and loading the
    model, which is what is being tested; chained, they share one model and one killed run."""
    inputs, out = copy_inputs(model, tmp_path / "in"), tmp_path / "out"
    ledger = out / "nnresume.sqlite"
    # SIGKILL when the second group of finished cases is durable, before its commit, each result committed on its
    # own (a group window of 0): cases take ~0.15 s, so with the default window all three may share one group, and a
    # kill from here after seeing the first done row sometimes came too late
    proc = start_nnresume(model.raw, model.preprocessed, "predict", "-i", str(inputs), "-o", str(out), *ARGS,
                          "--no-pbar", "-npp", "1", NNRESUME_CRASH_AT="group_files_synced:2",
                          NNRESUME_GROUP_WINDOW="0")
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""
    device = json.loads(next((out / ".nnresume" / "staging").glob("run-*/device.json")).read_text())["pid"]
    assert _gone_within(device, 15), "the device process outlived the orchestrator"
    kill_group(proc, signal.SIGKILL)  # its workers
    before = done_rows(out)
    assert 1 <= len(before) < SPEC.num_cases, "the run finished before it could be killed"
    killed_run = ledger_query(ledger, "select max(id) from runs")[0][0]

    predict(model, inputs, out, "-npp", "1")
    after = done_rows(out)
    assert sorted(after) == cases()
    redone = {c for (c,) in ledger_query(ledger, "select case_name from attempts where run_id > ?", (killed_run,))}
    assert redone == set(cases()) - set(before)
    for case, run_id in before.items():  # finished cases were not redone: their rows are the killed run's
        assert after[case] == run_id
    assert_same_predictions(out, model.reference, cases(), probabilities=False)

    # another model key (no test-time mirroring): every case would be predicted again
    r = run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(inputs), "-o", str(out), *ARGS,
                     "--disable_tta", "--dry-run")
    assert r.stdout.count(": model changed") == SPEC.num_cases, r.stdout

    # nothing changed: nothing is predicted
    n_attempts = ledger_query(ledger, "select count(*) from attempts")[0][0]
    text = predict(model, inputs, out)
    assert "nothing to do" in text
    assert ledger_query(ledger, "select count(*) from attempts")[0][0] == n_attempts

    # touched but the same: hashed again, not predicted
    os.utime(inputs / f"{cases()[0]}_0000.nii.gz", (1e9, 1e9))
    assert "nothing to do" in predict(model, inputs, out)
    assert ledger_query(ledger, "select count(*) from attempts")[0][0] == n_attempts

    # one changed input, and another case's output cut short (found by verify): only those two are predicted again
    changed_case, victim_case = cases()[1], cases()[2]
    changed = inputs / f"{changed_case}_0001.nii.gz"
    import SimpleITK as sitk

    image = sitk.ReadImage(str(changed))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 0.5 + 7, str(changed))
    victim = out / f"{victim_case}.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])
    r = run_nnresume(model.raw, model.preprocessed, "verify", "-o", str(out), "--no-pbar", expect=3)
    assert f"case {victim_case} [prediction] {victim}: size" in r.stdout, r.stdout
    status = run_nnresume(model.raw, model.preprocessed, "status", "-o", str(out), "--json")
    assert '"pending": 1' in status.stdout and '"done": 2' in status.stdout, status.stdout
    dry = run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(inputs), "-o", str(out), *ARGS,
                       "--dry-run").stdout
    assert f"{changed_case}: input changed" in dry and victim_case in dry, dry
    text = predict(model, inputs, out)
    assert "2 case(s) to do" in text, text
    last = ledger_query(ledger, "select max(id) from runs")[0][0]
    redone = ledger_query(ledger, "select distinct case_name from attempts where run_id=? order by case_name",
                          (last,))
    assert redone == [(changed_case,), (victim_case,)]
    assert_same_predictions(out, model.reference, [cases()[0], victim_case], probabilities=False)


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_loaded_fails_every_case_with_its_reason(model: Model, tmp_path: Path) -> None:
    """A checkpoint cut short: the device process cannot load it, says why, and is not started again; each case
    fails with that reason (no traceback, no wait), and the exit code says cases failed."""
    folder = tmp_path / "model"
    shutil.copytree(model.results / SPEC.folder_name / f"nnUNetTrainer__nnUNetPlans__{CONFIG}", folder)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    out = tmp_path / "out"
    r = run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(model.inputs), "-o", str(out), "-m",
                     str(folder), "-f", "0", "-device", "cpu", "--no-pbar", expect=3, timeout=300)
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    assert "starting it again" not in text, text
    for case in cases():
        assert f"[failed] case {case} ({folder}): the model could not be loaded: " in text, text
    assert done_rows(out) == {}


def test_cases_are_grouped_as_nnunet_groups_them(tmp_path: Path) -> None:
    """As create_lists_from_splitted_dataset_folder: the identifier is the name without `_XXXX<ending>`; a case's
    files are those named `<identifier>_<4 digits><ending>`, sorted; other endings are ignored."""
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_x_0000.nii.gz", "c_0000.nrrd", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = list_input_cases(tmp_path, ".nii.gz")
    assert found == {"a": (str(tmp_path / "a_0000.nii.gz"),), "a_x": (str(tmp_path / "a_x_0000.nii.gz"),),
                     "b": (str(tmp_path / "b_0000.nii.gz"), str(tmp_path / "b_0001.nii.gz"))}


def test_a_wrong_channel_count_names_the_missing_or_extra_file() -> None:
    """The worker's check between reading and preprocessing, where nnU-Net would go on with the wrong channels; and
    the files a case's prediction writes, the segmentation last."""
    from nnresume.errors import CaseError
    from nnresume.worker.inference.case import check_channels, output_names

    two = ["/in/c_0000.nii.gz", "/in/c_0001.nii.gz"]
    check_channels("c", two, ".nii.gz", 2, 2)  # as the model takes: nothing to say
    with pytest.raises(CaseError) as missing:
        check_channels("c", two[:1], ".nii.gz", 1, 2)
    assert missing.value.path == "/in/c_0001.nii.gz" and "channel file missing: c_0001.nii.gz" in str(missing.value)
    with pytest.raises(CaseError) as extra:
        check_channels("c", [*two, "/in/c_0002.nii.gz"], ".nii.gz", 3, 2)
    assert extra.value.path == "/in/c_0002.nii.gz" and "have 3 channel(s) but the model takes 2" in str(extra.value)
    assert output_names("c", ".nii.gz", False) == ["c.nii.gz"]
    assert output_names("c", ".nii.gz", True) == ["c.npz", "c.pkl", "c.nii.gz"]


def test_why_a_case_is_predicted_again(tmp_path: Path) -> None:
    """The ledger's row for a case's prediction against its input digest, the model key and the files on disk."""
    from types import SimpleNamespace
    from typing import Any, cast

    from nnresume.ledger.models import TaskState
    from nnresume.ledger.records import OutputRecord
    from nnresume.predict.run import prediction_reason

    (tmp_path / "c.nii.gz").write_bytes(b"x" * 10)
    model = cast(Any, SimpleNamespace(spec=SimpleNamespace(key="model-1")))

    def row(state: TaskState = TaskState.done, digest: str = "in-1", key: str = "model-1", size: int = 10,
            attempts: int = 1, error: str | None = None) -> OutputRecord:
        return OutputRecord("c", "prediction", "3d_fullres", state, key, digest, [{"name": "c.nii.gz", "size": size}],
                            attempts, 0, None, None, None, error, 0.0)

    assert prediction_reason(row(), "in-1", model, tmp_path) is None
    assert prediction_reason(None, "in-1", model, tmp_path) == "new"
    assert prediction_reason(row(TaskState.pending, attempts=0), "in-1", model, tmp_path) == "not started yet"
    assert prediction_reason(row(TaskState.pending), "in-1", model, tmp_path) == "interrupted"
    assert prediction_reason(row(TaskState.running), "in-1", model, tmp_path) == "interrupted"
    assert prediction_reason(row(TaskState.failed), "in-1", model, tmp_path) == "failed before"
    assert prediction_reason(row(), "in-2", model, tmp_path) == "input changed"
    assert prediction_reason(row(key="model-0"), "in-1", model, tmp_path) == "model changed"
    assert prediction_reason(row(size=11), "in-1", model, tmp_path) == "output size differs: c.nii.gz"
    (tmp_path / "c.nii.gz").unlink()
    assert prediction_reason(row(), "in-1", model, tmp_path) == "output missing: c.nii.gz"


def test_the_predict_orchestrator_never_imports_nnunetv2_or_torch() -> None:
    code = ("import sys\nimport nnresume.predict.run, nnresume.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'torch')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_2d_predictions_identical_to_nnunet(model: Model, model_2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(model_2d), "-o", str(out), "-d",
                 str(SPEC.dataset_id), "-c", "2d", "-f", "0", "-device", "cpu", "--save_probabilities", "--no-pbar")
    assert_same_predictions(out, model.root / "reference-2d", [case_name(SPEC, 0)], probabilities=True)


@pytest.mark.slow
def test_ensemble_of_two_folds_identical_to_nnunet(model: Model, two_folds: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(two_folds), "-o", str(out), "-d",
                 str(SPEC.dataset_id), "-c", CONFIG, "-f", "0", "1", "-device", "cpu", "--save_probabilities",
                 "--no-pbar")
    two = [case_name(SPEC, i) for i in range(2)]
    assert_same_predictions(out, model.root / "reference-ensemble", two, probabilities=True)
    # the ensemble is not fold 0 alone: the test would pass for a run that ignored the second fold otherwise
    single = np.load(model.reference / f"{two[0]}.npz")["probabilities"]
    assert not np.array_equal(np.load(out / f"{two[0]}.npz")["probabilities"], single)
    # the model key holds the folds: fold 0 alone into the same folder predicts both cases again
    r = run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(two_folds), "-o", str(out), *ARGS,
                     "--save_probabilities", "--dry-run")
    assert r.stdout.count(": model changed") == 2, r.stdout


@pytest.mark.slow
def test_a_worker_and_the_device_process_killed_mid_case_are_replaced(model: Model, tmp_path: Path) -> None:
    """SIGKILL of a worker after it wrote its case's files into staging, and of the process that holds the network
    while it predicts another case (as the OOM killer would): the worker's case is retried in a new worker, the
    device process is started again and the worker waiting on it sends its case again, and the predictions are
    nnUNetv2_predict's."""
    out, once = tmp_path / "out", tmp_path / "crashed"
    worker_victim, device_victim = case_name(SPEC, 1), case_name(SPEC, 2)
    r = run_nnresume(model.raw, model.preprocessed, "predict", "-i", str(model.inputs), "-o", str(out), *ARGS,
                     "--no-pbar", "-npp", "2", NNRESUME_CRASH_AT=f"staged@{worker_victim}=kill,"
                     f"device_inference@{device_victim}=kill", NNRESUME_CRASH_ONCE=str(once))
    text = r.stdout + r.stderr
    assert Path(f"{once}.0").exists() and Path(f"{once}.1").exists(), "a crash point was not reached"
    assert "killed by SIGKILL" in text
    assert "was killed by SIGKILL; starting it again" in text, text
    assert "started again 1 time(s)" in text, text
    assert sorted(done_rows(out)) == cases()
    ledger = out / "nnresume.sqlite"
    outcomes = ledger_query(ledger, "select outcome from attempts where case_name=? order by id", (worker_victim,))
    assert [o for (o,) in outcomes] == ["died", "ok"], outcomes
    outcomes = ledger_query(ledger, "select outcome from attempts where case_name=? order by id", (device_victim,))
    assert [o for (o,) in outcomes] == ["ok"], outcomes  # no worker died: it sent its case again
    assert_same_predictions(out, model.reference, cases(), probabilities=False)
    assert not any((out / ".nnresume" / "staging").glob("*/*"))


@pytest.mark.slow
def test_a_missing_channel_and_a_case_that_kills_the_device_process_fail_alone(model: Model, tmp_path: Path) -> None:
    """One case misses a channel file: it fails with a message naming the file. Another kills the device process
    each time it is predicted: it fails after three deaths with a message saying so. The third is predicted as
    nnUNetv2_predict predicts it, and the exit code says cases failed."""
    inputs, out = copy_inputs(model, tmp_path / "in"), tmp_path / "out"
    killer, missing = case_name(SPEC, 0), case_name(SPEC, 1)
    (inputs / f"{missing}_0001.nii.gz").unlink()
    text = predict(model, inputs, out, "-npp", "2", NNRESUME_CRASH_AT=f"device_inference@{killer}=kill", expect=3)
    assert f"case {missing} ({inputs / f'{missing}_0001.nii.gz'}): channel file missing" in text, text
    assert f"case {killer}" in text and "the device process died 3 times while predicting this case" in text, text
    others = [c for c in cases() if c not in (killer, missing)]
    assert sorted(done_rows(out)) == others
    assert_same_predictions(out, model.reference, others, probabilities=False)
    assert not (out / f"{killer}.nii.gz").exists() and not (out / f"{missing}.nii.gz").exists()
