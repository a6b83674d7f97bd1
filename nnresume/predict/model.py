"""Which trained model `nnresume predict` uses, and its key in the ledger.

The model folder is found as nnUNetv2_predict finds it (`nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>`)
or given with `-m`, as for nnUNetv2_predict_from_modelfolder. Everything is checked before any work: the folder, its
plans.json and dataset.json, and one checkpoint per requested fold.

The model key is what every prediction depends on besides the case's own input files: the checkpoint files of the
chosen folds (their SHA-256), plans.json, dataset.json, the folder's name (trainer, plans, configuration), the folds,
the checkpoint name, the step size, test-time mirroring, --save_probabilities and nnunetv2's version. A different key
redoes every case. The device is not part of it: a CPU run after a GPU run keeps the GPU's predictions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import MemoryBudget
from ..dataset import OUTPUT_FORMAT_VERSION, key_of, num_channels, resolve_dataset_name
from ..errors import DatasetError, UsageError
from ..io import atomic
from ..tasks import ModelSpec

DEFAULT_FOLDS: tuple[str, ...] = ("0", "1", "2", "3", "4")
DEVICES = ("cuda", "cpu", "mps")
PREDICTION = "prediction"  # the data identifier of a prediction's row in the ledger's outputs


@dataclass(frozen=True)
class PredictSettings:
    """Everything `nnresume predict` needs, as the user gave it (nnUNetv2_predict's names and defaults)."""

    input_folder: str
    output_folder: str
    dataset: Optional[str] = None
    configuration: Optional[str] = None
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    model_folder: Optional[str] = None
    folds: tuple[str, ...] = DEFAULT_FOLDS
    checkpoint: str = "checkpoint_final.pth"
    step_size: float = 0.5
    disable_tta: bool = False
    save_probabilities: bool = False
    device: str = "cuda"
    num_workers: int = 3  # -npp: cases preprocessed (and predicted, and exported) at once
    num_workers_export: int = 3  # -nps: accepted for compatibility; each worker exports its own case
    verbose: bool = False
    max_ram: MemoryBudget = field(default_factory=MemoryBudget)
    progress_bar: bool = True
    dry_run: bool = False
    retry_quarantined: bool = False
    grace_seconds: float = 20.0
    allow_oversize: bool = False


@dataclass(frozen=True)
class Model:
    spec: ModelSpec
    configuration: str
    dataset_json: dict[str, Any]
    plans: dict[str, Any]
    checkpoints: tuple[Path, ...]

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json["file_ending"])

    @property
    def num_channels(self) -> int:
        return num_channels(self.dataset_json)


def model_folder(settings: PredictSettings) -> Path:
    if settings.model_folder:
        return Path(settings.model_folder).resolve()
    if not settings.dataset or not settings.configuration:
        raise UsageError("give -d DATASET and -c CONFIGURATION (or -m MODEL_FOLDER)")
    results = os.environ.get("nnUNet_results")
    if not results:
        raise UsageError("environment variable nnUNet_results not set",
                         "export nnUNet_results as for nnUNetv2_predict, or give the model folder with -m")
    name = resolve_dataset_name(settings.dataset, os.environ.get("nnUNet_raw", ""),
                                os.environ.get("nnUNet_preprocessed", ""))
    return Path(results) / name / f"{settings.trainer}__{settings.plans}__{settings.configuration}"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing", "a trained model folder holds plans.json and dataset.json") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    return content


def resolve_model(settings: PredictSettings, nnunetv2_version: str) -> Model:
    """The model folder, checked, with its key (see the module docstring)."""
    folder = model_folder(settings)
    if not folder.is_dir():
        raise UsageError(f"model folder {folder} does not exist",
                         "check -d, -tr, -p and -c (or -m) and nnUNet_results; train the model first")
    if settings.device not in DEVICES:
        raise UsageError(f"-device {settings.device}: must be one of {', '.join(DEVICES)}")
    if not 0 < settings.step_size <= 1:
        raise UsageError(f"-step_size {settings.step_size}: must be above 0 and at most 1")
    plans = _load_json(folder / "plans.json")
    dataset_json = _load_json(folder / "dataset.json")
    if "file_ending" not in dataset_json:
        raise DatasetError(f"{folder / 'dataset.json'} has no 'file_ending'")
    checkpoints = []
    for fold in settings.folds:
        path = folder / f"fold_{fold}" / settings.checkpoint
        if not path.is_file():
            have = sorted(p.parent.name for p in folder.glob(f"fold_*/{settings.checkpoint}"))
            raise UsageError(f"-f {fold}: {path} is missing",
                             f"folds with {settings.checkpoint}: {', '.join(have) or 'none'}; choose them with -f")
        checkpoints.append(path)
    parts = folder.name.split("__")
    configuration = settings.configuration or (parts[-1] if len(parts) == 3 else folder.name)
    key = key_of({
        "format": OUTPUT_FORMAT_VERSION,
        "checkpoints": {f"{p.parent.name}/{p.name}": atomic.file_digest(p) for p in checkpoints},
        "plans": atomic.file_digest(folder / "plans.json"),
        "dataset_json": atomic.file_digest(folder / "dataset.json"),
        "model": folder.name,
        "folds": list(settings.folds),
        "step_size": settings.step_size,
        "tta": not settings.disable_tta,
        "save_probabilities": settings.save_probabilities,
        "nnunetv2": nnunetv2_version,
    })
    spec = ModelSpec(folder=str(folder), folds=tuple(settings.folds), checkpoint=settings.checkpoint,
                     step_size=settings.step_size, disable_tta=settings.disable_tta,
                     save_probabilities=settings.save_probabilities, device=settings.device, key=key,
                     verbose=settings.verbose)
    return Model(spec, configuration, dataset_json, plans, tuple(checkpoints))
