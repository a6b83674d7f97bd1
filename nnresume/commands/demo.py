"""`nnresume demo`: a synthetic dataset (Dataset999_Demo) generated into its own folder, preprocessed, and its status.

It uses its own nnUNet_raw and nnUNet_preprocessed inside the folder, whatever the environment says, so it never
touches a user's data. Run it twice: the second run finds everything done.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config import Paths, PreprocessSettings
from ..preprocess.run import preprocess_datasets
from ..synthetic import DemoSpec, make_dataset

log = logging.getLogger(__name__)


def run_demo(folder: Path, cases: int, settings: PreprocessSettings) -> tuple[int, Paths, str]:
    """Generates the dataset if it is not there and preprocesses it as `nnresume preprocess` does; returns the exit
    code, the demo's paths and its dataset id (for the status the CLI shows)."""
    root = folder.resolve()
    paths = Paths(raw=str(root / "nnUNet_raw"), preprocessed=str(root / "nnUNet_preprocessed"))
    spec = DemoSpec(num_cases=cases)
    if not (Path(paths.raw) / spec.folder_name / "dataset.json").is_file():
        log.info("Writing %d synthetic cases to %s", cases, Path(paths.raw) / spec.folder_name)
        make_dataset(spec, Path(paths.raw))
    code = preprocess_datasets(dataclasses.replace(settings, datasets=(str(spec.dataset_id),)), paths)
    return code, paths, str(spec.dataset_id)
