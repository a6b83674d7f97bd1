"""The child side of `nnresume predict`: one case through nnU-Net's own predictor, its files written into staging.

Per case, the steps `nnUNetPredictor.predict_from_files` takes, with nnU-Net's own functions and the same arguments:
the plans' reader reads the images, the configuration's preprocessor (`run_case_npy`) preprocesses them,
`predict_logits_from_preprocessed_data` runs the sliding window (all folds, test-time mirroring unless disabled), and
`export_prediction_from_logits` resamples and writes the segmentation (and, with --save_probabilities, the `.npz` and
`.pkl`). Only where the files go differs: a staging folder, from which the orchestrator renames them into place.

A worker is long-lived: the loaded predictor is kept for the next case, keyed on the model key, so the network and
its weights are loaded once per worker, not once per case. Only a different model replaces it.

The channels are checked between reading and preprocessing: nnU-Net itself goes on with too few channels (and
crashes later, or predicts from the wrong inputs); here the case fails with a message naming the file.

Besides worker/nnunet.py, the only module that imports nnunetv2; imported by worker/run.py only when a prediction
task arrives, so preprocessing workers never load torch's inference code.
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from ..errors import CaseError, InputChangedError
from ..tasks import ModelSpec, OutputResult, PredictTask
from .nnunet import quiet
from .run import _stage_files, _stat, peak_rss

# model key -> loaded predictor; at most one, the model of the run this worker serves
_loaded: dict[str, Any] = {}


def output_names(case: str, file_ending: str, save_probabilities: bool) -> list[str]:
    """The files nnU-Net writes for a case, in the order they are moved into place (the segmentation last, so that
    its presence means the probabilities beside it are complete too)."""
    return ([case + ".npz", case + ".pkl"] if save_probabilities else []) + [case + file_ending]


def load_predictor(model: ModelSpec) -> Any:
    """The predictor for `model`, loaded on first use in this worker, as nnUNetv2_predict builds it."""
    predictor = _loaded.get(model.key)
    if predictor is not None:
        return predictor
    _loaded.clear()
    if model.device == "cpu":
        # as nnUNetv2_predict does for -device cpu
        torch.set_num_threads(multiprocessing.cpu_count())
    elif model.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    predictor = nnUNetPredictor(tile_step_size=model.step_size, use_gaussian=True,
                                use_mirroring=not model.disable_tta, perform_everything_on_device=True,
                                device=torch.device(model.device), verbose=model.verbose,
                                verbose_preprocessing=model.verbose, allow_tqdm=False)
    folds = [f if f == "all" else int(f) for f in model.folds]
    predictor.initialize_from_trained_model_folder(model.folder, folds, model.checkpoint)
    _loaded[model.key] = predictor
    return predictor


def check_channels(case: str, images: list[str], file_ending: str, found: int, expected: int) -> None:
    """The reader returned `found` channels where the model takes `expected`: name what is missing or extra."""
    if found == expected:
        return
    folder = os.path.dirname(images[0]) if images else ""
    present = {os.path.basename(p) for p in images}
    wanted = [f"{case}_{i:04d}{file_ending}" for i in range(expected)]
    missing = [w for w in wanted if w not in present]
    extra = sorted(present - set(wanted))
    if found < expected and missing:
        raise CaseError(case, f"channel file missing: {', '.join(missing)} (the model takes {expected} channel(s), "
                              f"the case has {found})", os.path.join(folder, missing[0]),
                        "add the missing file, or remove the case from the input folder")
    where = os.path.join(folder, extra[0]) if extra else (images[0] if images else folder)
    raise CaseError(case, f"the images have {found} channel(s) but the model takes {expected}", where,
                    "give the case the channels the model was trained with")


def _check_unchanged(task: PredictTask, when: str) -> None:
    for f in task.expected:
        st = _stat(task.case, f.path)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise InputChangedError(task.case, f"file changed {when}", f.path,
                                    "rerun once the file is complete: the case is predicted again")


def _nnunet_step(case: str, step: str, path: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`; nnU-Net's own errors for this case become a CaseError naming the case, the file and the step."""
    try:
        return fn(*args)
    except (CaseError, MemoryError, OSError):
        raise
    except Exception as e:
        message = re.sub(r"\s+", " ", str(e)).strip()[:500]
        raise CaseError(case, f"{step} failed: {type(e).__name__}: {message}", path) from e


@contextlib.contextmanager
def device_turn(lock_path: str) -> Iterator[None]:
    """The sliding-window inference of one case at a time across the workers, as nnUNetv2_predict's single predictor
    runs them: each inference uses every CPU thread (or the GPU), so two at once only compete, and on the CPU their
    threads oversubscribe the cores (measured: 10 % more CPU time for the same predictions). Reading, preprocessing
    and export of other cases go on meanwhile in their workers. An flock is released by the kernel when its process
    dies, so a killed worker never keeps the turn."""
    fd = None
    if lock_path:
        try:
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            pass
    if fd is None:  # without the lock the predictions are the same, only slower when several run at once
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_predict(task: PredictTask, send: Callable[[Any], None]) -> None:
    with quiet():  # nnU-Net's prints go to the debug log
        _predict(task, send)


def _predict(task: PredictTask, send: Callable[[Any], None]) -> None:
    t0 = time.time()
    _check_unchanged(task, "after it was hashed")
    predictor = load_predictor(task.model)
    images = list(task.images)
    if not images:
        raise CaseError(task.case, "no image files", None, "input files are named <case>_0000" + task.file_ending)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    rw = pm.image_reader_writer_class()
    data, properties = _nnunet_step(task.case, "reading the images", images[0], rw.read_images, images)
    check_channels(task.case, images, task.file_ending, int(data.shape[0]), task.num_channels)
    _check_unchanged(task, "while it was being read")
    preprocessor = cm.preprocessor_class(verbose=task.model.verbose)
    data, _, properties = _nnunet_step(task.case, "preprocessing", images[0], preprocessor.run_case_npy,
                                       data, None, properties, pm, cm, predictor.dataset_json)
    # as nnU-Net's preprocessing iterator hands the case to the network
    tensor = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    del data
    with device_turn(task.device_lock):
        logits = _nnunet_step(task.case, "prediction", images[0], predictor.predict_logits_from_preprocessed_data,
                              tensor).cpu().detach().numpy()
    del tensor

    def write(prefix: str) -> None:
        _nnunet_step(task.case, "export", images[0], export_prediction_from_logits, logits, properties, cm, pm,
                     predictor.dataset_json, prefix, task.model.save_probabilities)

    names = output_names(task.case, task.file_ending, task.model.save_probabilities)
    staged = _stage_files(task.staging, task.case, names, write)
    send(OutputResult(task.case, task.target, staged, time.time() - t0, peak_rss()))
