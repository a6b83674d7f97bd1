"""The child side of `nnresume predict`: one case through nnU-Net's own predictor, its files written into staging.

Per case, the steps `nnUNetPredictor.predict_from_files` takes, with nnU-Net's own functions and the same arguments:
the plans' reader reads the images, the configuration's preprocessor (`run_case_npy`) preprocesses them,
`predict_logits_from_preprocessed_data` runs the sliding window (all folds, test-time mirroring unless disabled), and
`export_prediction_from_logits` resamples and writes the segmentation (and, with --save_probabilities, the `.npz` and
`.pkl`). Only where the files go differs: a staging folder, from which the orchestrator renames them into place.

The sliding window runs in the run's device process (worker/inference/device.py), which holds the network once; a worker
reads, preprocesses and exports, and hands each case's preprocessed array to that process and waits for its logits.
A worker needs only the model's plans and dataset.json, read once per worker and model key, and the configuration
the device process's predictor resolved for the checkpoint (its info file).

The channels are checked between reading and preprocessing: nnU-Net itself goes on with too few channels (and
crashes later, or predicts from the wrong inputs); here the case fails with a message naming the file.

With worker/nnunet.py and inference/device.py, the only modules that import nnunetv2; imported by worker/run.py only
when a prediction task arrives, so preprocessing workers never load torch's inference code.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ...errors import CaseError, InputChangedError
from ...tasks import OutputResult, PredictTask
from ..files import stage_files, stat_input
from ..nnunet import quiet
from ..process import peak_rss

# model key -> (plans manager, configuration manager, dataset.json); at most one, in a worker
_model_files: dict[str, tuple[Any, Any, dict[str, Any]]] = {}


def output_names(case: str, file_ending: str, save_probabilities: bool) -> list[str]:
    """The files nnU-Net writes for a case, in the order they are moved into place (the segmentation last, so that
    its presence means the probabilities beside it are complete too)."""
    return ([case + ".npz", case + ".pkl"] if save_probabilities else []) + [case + file_ending]


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
        st = stat_input(task.case, f.path)
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


DEVICE_DEATHS = 3  # deaths of the device process while it serves one case before that case is given up
DEVICE_WAIT = 30 * 60  # seconds a worker waits for the device process to be ready before its case fails


def _device_info(task: PredictTask) -> dict[str, Any]:
    """The device process's word that it is ready (or why it could not load the model), waited for."""
    deadline = time.monotonic() + DEVICE_WAIT
    while True:
        try:
            with open(task.device.info) as f:
                info: dict[str, Any] = json.load(f)
            break
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise CaseError(task.case, f"the device process was not ready after {DEVICE_WAIT} s",
                                task.model.folder, "see the run log for why it could not start") from None
            time.sleep(0.05)
    if "error" in info:
        raise CaseError(task.case, f"the model could not be loaded: {info['error']}", task.model.folder,
                        "check the model folder's checkpoints, plans.json and dataset.json")
    return info


def model_files(task: PredictTask) -> tuple[Any, Any, dict[str, Any]]:
    """The plans manager, the configuration manager and dataset.json, as nnUNetPredictor builds them from the model
    folder (the configuration as the device process's predictor resolved it); once per worker and model key."""
    files = _model_files.get(task.model.key)
    if files is None:
        configuration = ConfigurationManager(_device_info(task)["configuration"])
        with open(os.path.join(task.model.folder, "dataset.json")) as f:
            dataset_json = json.load(f)
        with open(os.path.join(task.model.folder, "plans.json")) as f:
            plans_manager = PlansManager(json.load(f))
        files = (plans_manager, configuration, dataset_json)
        _model_files.clear()
        _model_files[task.model.key] = files
    return files


def _connect(task: PredictTask) -> Connection:
    """A connection the device process has accepted, which means it is serving this case now; waits its turn (the
    process serves workers one at a time, in the order they connect) and through a restart of the process."""
    deadline = time.monotonic() + DEVICE_WAIT
    while True:
        try:
            return Client(task.device.address, "AF_UNIX", authkey=task.device.authkey)
        except (OSError, EOFError):  # not listening (starting again after a death), or died before our turn
            if time.monotonic() > deadline:
                raise CaseError(task.case, f"the device process did not answer for {DEVICE_WAIT} s",
                                task.images[0], "see the run log") from None
            _device_info(task)  # gave up for good: says why
            time.sleep(0.05)


def infer(task: PredictTask, data: np.ndarray) -> np.ndarray:
    """The logits of `data` (a case's preprocessed array) from the device process. Should the process die while it
    serves this case, the case is sent again to the process started in its place, up to DEVICE_DEATHS times."""
    deaths = 0
    while True:
        conn = _connect(task)
        try:
            conn.send((task.case, task.task_id, data.dtype.str, data.shape))
            conn.send_bytes(data.data.cast("B"))
            reply = conn.recv()
            if reply[0] == "logits":
                logits = np.empty(reply[2], dtype=np.dtype(reply[1]))
                conn.recv_bytes_into(logits.data.cast("B"))
                return logits
        except (OSError, EOFError):
            deaths += 1
            if deaths >= DEVICE_DEATHS:
                raise CaseError(task.case, f"the device process died {deaths} times while predicting this case",
                                task.images[0], "see the run log for how it died; if the OOM killer ended it, "
                                "rerun with more memory") from None
            continue
        finally:
            conn.close()
        if reply[0] == "memory":
            raise MemoryError(reply[1])
        raise CaseError(task.case, f"prediction failed: {reply[1]}", task.images[0])


def run_predict(task: PredictTask, send: Callable[[Any], None]) -> None:
    with quiet():  # nnU-Net's prints go to the debug log
        _predict(task, send)


def _predict(task: PredictTask, send: Callable[[Any], None]) -> None:
    t0 = time.time()
    _check_unchanged(task, "after it was hashed")
    images = list(task.images)
    if not images:
        raise CaseError(task.case, "no image files", None, "input files are named <case>_0000" + task.file_ending)
    pm, cm, dataset_json = model_files(task)
    rw = pm.image_reader_writer_class()
    data, properties = _nnunet_step(task.case, "reading the images", images[0], rw.read_images, images)
    check_channels(task.case, images, task.file_ending, int(data.shape[0]), task.num_channels)
    _check_unchanged(task, "while it was being read")
    preprocessor = cm.preprocessor_class(verbose=task.model.verbose)
    data, _, properties = _nnunet_step(task.case, "preprocessing", images[0], preprocessor.run_case_npy,
                                       data, None, properties, pm, cm, dataset_json)
    # as nnU-Net's preprocessing iterator hands the case to the network (float32), in one block of memory to send
    data = np.ascontiguousarray(torch.from_numpy(data).to(dtype=torch.float32).numpy())
    logits = infer(task, data)
    del data

    def write(prefix: str) -> None:
        _nnunet_step(task.case, "export", images[0], export_prediction_from_logits, logits, properties, cm, pm,
                     dataset_json, prefix, task.model.save_probabilities)

    names = output_names(task.case, task.file_ending, task.model.save_probabilities)
    staged = stage_files(task.staging, task.case, names, write)
    send(OutputResult(task.case, task.target, staged, time.time() - t0, peak_rss()))
