"""A trained nnU-Net model made in the test session without any download, and nnUNetv2_predict's outputs with it.

The model: a small two-channel synthetic dataset, planned by nnU-Net (no preprocessing needed), and the checkpoints
of initialised `nnUNetTrainer`s (random weights; 3d_fullres folds 0 and 1, 2d fold 0; the planner's small patch,
fewer features per stage, so CPU inference takes seconds). Random weights are enough to compare two programs that
run the same network. Made once per session as references (tests/references.py); the prediction tests and the
prediction out-of-memory test use it.
"""
from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from nnresume.synthetic import DemoSpec, case_name, make_dataset

from .references import Lane, References, env_for, job, nnunet_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchlib import MAKE_MODEL  # noqa: E402

SPEC = DemoSpec(dataset_id=951, name="Pred", num_cases=3, channels=("CT", "T2"), min_shape=(12, 24, 24),
                max_shape=(16, 32, 32), seed=5)
CONFIG = "3d_fullres"


class Model:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw, self.preprocessed, self.results = root / "raw", root / "preprocessed", root / "results"
        self.inputs = self.raw / SPEC.folder_name / "imagesTr"
        self.reference = root / "reference"

    def env(self) -> dict[str, str]:
        return env_for(self.raw, self.preprocessed)


# MAKE_MODEL for several (configuration, fold) in one interpreter: torch and nnU-Net's trainer imported once
MAKE_MODELS = ("import sys\nsource, preprocessed, dataset = sys.argv[1:4]\n"
               "for spec in sys.argv[4:]:\n"
               "    sys.argv = ['make_model', preprocessed, dataset, *spec.split(':')]\n"
               "    exec(source, {'__name__': '__main__'})\n")


def _predict_reference(lane: Lane, model: Model, inputs: Path, out: Path, config: str, folds: list[str]) -> None:
    lane.run([nnunet_command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(SPEC.dataset_id),
              "-c", config, "-f", *folds, "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1",
              "--disable_progress_bar"], model.env())


def _model(references: References, folder: Path, lane: Lane) -> Model:
    """The models (3d_fullres folds 0 and 1, 2d fold 0: random weights), and nnUNetv2_predict's outputs (with
    probabilities) of 3d_fullres fold 0 on the dataset's images."""
    m = Model(folder)
    make_dataset(SPEC, m.raw)
    env = m.env()
    lane.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(SPEC.dataset_id), "-c", CONFIG, "--no_pp",
              "-npfp", "1"], env)
    lane.run([sys.executable, "-c", MAKE_MODELS, MAKE_MODEL, str(m.preprocessed), SPEC.folder_name,
              f"{CONFIG}:0", f"{CONFIG}:1", "2d:0"], env)
    _predict_reference(lane, m, m.inputs, m.reference, CONFIG, ["0"])
    return m


def _subset_reference(name: str, case_indices: range, config: str, folds: list[str]
                      ) -> Callable[[References, Path, Lane], Path]:
    """A folder with these cases' images, and nnUNetv2_predict's outputs for them (with probabilities) in
    `model.root / reference-<name>`; returns the inputs."""
    def make(references: References, folder: Path, lane: Lane) -> Path:
        model = references.get("predict-model")
        inputs = folder / "inputs"
        inputs.mkdir()
        for i in case_indices:
            for f in model.inputs.glob(f"{case_name(SPEC, i)}_*"):
                shutil.copy2(f, inputs / f.name)
        _predict_reference(lane, model, inputs, model.root / f"reference-{name}", config, folds)
        return inputs
    return make


job("predict-model", _model, cost=65)
# a 2D model of the same dataset and plans, and nnUNetv2_predict's outputs for one case
job("predict-2d", _subset_reference("2d", range(1), "2d", ["0"]), requires=("predict-model",), cost=20)
# nnUNetv2_predict's ensemble of folds 0 and 1 (other random weights) for two cases
job("predict-ensemble", _subset_reference("ensemble", range(2), CONFIG, ["0", "1"]),
    requires=("predict-model",), cost=26)
