"""The device process of `nnresume predict`: the one process that holds the network and runs the sliding window.

It loads nnU-Net's predictor once (`load_predictor`, as nnUNetv2_predict builds it), says so in the run's info file (its
pid, and the configuration the checkpoint was trained with as the predictor resolved it from the plans, which the
workers' preprocessing and export need), and then serves the prediction workers one case at a time, in the order they
connect: a worker sends a case's preprocessed array, the process runs `predict_logits_from_preprocessed_data` on it
(every fold, test-time mirroring unless disabled) and sends the logits back. Reading, preprocessing and export stay in
the workers, which the governor admits by memory. This process's memory while idle counts as the run's own; what it
takes beyond that while it serves a case is that case's (execution/pools/local.py): it tells the pool, through its pipe,
which task it serves and, when done, its peak above its idle size, which the estimates learn from. After each case it
gives the heap's free pages back to the system.

One case at a time, as nnUNetv2_predict's single predictor runs them: on the CPU each inference uses every thread,
and on a GPU the network and its weights are there once. Arrays travel through the socket as raw bytes into buffers
allocated for them, with no pickling of their contents.

A worker that dies while it is served costs only its connection. If this process dies (the OOM killer, a crash), the
orchestrator starts another (predict/device_owner.py); the worker it was serving sends its case again, and gives up on
that case after it has seen the process die `DEVICE_DEATHS` times while serving it (worker/inference/case.py).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import threading
import traceback
from multiprocessing.connection import Connection, Listener
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from tqdm import tqdm

from ...io import crashpoints
from ...tasks import DeviceLink, ModelSpec
from ..nnunet import quiet
from ..process import peak_rss, release_heap, reset_peak_rss, rss_now

log = logging.getLogger(__name__)

# model key -> loaded predictor; at most one, in the device process
_loaded: dict[str, Any] = {}


def load_predictor(model: ModelSpec) -> Any:
    """The predictor for `model`, loaded once in the device process, as nnUNetv2_predict builds it."""
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


def write_info(path: str, info: dict[str, Any]) -> None:
    """The info file, replaced whole (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def _exit_with_run(conn: Connection) -> None:
    """The orchestrator never writes to this pipe: it closes when the run ends or the orchestrator dies."""
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def serve(conn: Connection, link: DeviceLink, model: ModelSpec) -> None:
    # nnU-Net's sliding window opens a (disabled) tqdm bar, whose first use creates a multiprocessing lock: a named
    # semaphore this process, ended by os._exit or a signal, would leave to the resource tracker ("leaked semaphore
    # objects" at the run's end). One process needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_exit_with_run, args=(conn,), daemon=True).start()
    listener = Listener(link.address, "AF_UNIX", backlog=256, authkey=link.authkey)
    try:
        with quiet():
            predictor = load_predictor(model)
        # the configuration the checkpoint names, resolved as nnU-Net's predictor resolved it
        info = {"pid": os.getpid(), "configuration": predictor.configuration_manager.configuration}
        json.dumps(info)
    except Exception as e:
        message = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}").strip()[:500]
        log.debug("loading the model failed:\n%s", traceback.format_exc())
        write_info(link.info, {"pid": os.getpid(), "error": message})
        os._exit(1)
    write_info(link.info, info)
    while True:
        try:
            client = listener.accept()
        except Exception as e:  # a worker gone before or during the handshake
            log.debug("connection not accepted: %s", e)
            continue
        try:
            _serve_one(client, predictor, conn)
        except (EOFError, OSError) as e:  # the worker went away while it was served: its loss only
            log.debug("worker gone while served: %s", e)
        finally:
            client.close()


def _tell(pool: Connection, message: tuple[Any, ...]) -> None:
    try:
        pool.send(message)
    except (OSError, ValueError):  # the run is over: _exit_with_run ends this process
        pass


def _serve_one(client: Connection, predictor: Any, pool: Connection) -> None:
    case, task_id, dtype, shape = client.recv()
    reset_peak_rss()
    idle = rss_now()
    _tell(pool, ("serving", task_id))
    try:
        reply = _infer(client, predictor, case, dtype, shape)
    finally:  # told before the worker has its logits, so the pool knows it when the worker's result arrives
        _tell(pool, ("served", task_id, max(0, (peak_rss() or idle) - idle)))
    if isinstance(reply, np.ndarray):
        client.send(("logits", reply.dtype.str, reply.shape))
        client.send_bytes(reply.data.cast("B"))
    else:
        client.send(reply)
    del reply
    release_heap()


def _infer(client: Connection, predictor: Any, case: str, dtype: str, shape: tuple[int, ...]) -> Any:
    """The case's logits, or the reply that says why there are none."""
    data = np.empty(shape, dtype=np.dtype(dtype))
    client.recv_bytes_into(data.data.cast("B"))
    crashpoints.set_case(case)
    crashpoints.reached("device_inference")
    try:
        with quiet():
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu().detach().numpy()
        return np.ascontiguousarray(logits)
    except MemoryError as e:
        return ("memory", str(e))
    except Exception as e:
        log.debug("prediction of %s failed:\n%s", case, traceback.format_exc())
        return ("error", re.sub(r"\s+", " ", f"{type(e).__name__}: {e}").strip()[:500])
    finally:
        del data
        crashpoints.set_case(None)
