"""The child side: run one task, write its files into staging, report back over a pipe.

A worker process is forked from a forkserver that imported this module (and so nnunetv2) once, which saves the ~4 s
of imports a fresh interpreter per case would cost. It ignores SIGINT and SIGTERM (the orchestrator decides when
running cases stop) and dies with its parent (PR_SET_PDEATHSIG), so a killed orchestrator leaves no worker behind.

Messages sent: a FingerprintResult, or one OutputResult per configuration as soon as its files are staged (so the
orchestrator commits each as it comes), then TaskFinished; or TaskFailed. A worker that dies sends nothing more; the
orchestrator learns of it from the process sentinel.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from .. import dataset, geometry
from ..errors import CaseError, InputChangedError, NnresumeError
from ..io import blobs, crashpoints, readcache
from ..tasks import (
    AggregateTask,
    CaseWarning,
    ClassCheckTask,
    DatasetResult,
    FingerprintResult,
    FingerprintTask,
    InputFileInfo,
    InspectResult,
    InspectTask,
    IntegrityTask,
    OutputResult,
    PlanTask,
    PredictTask,
    PreprocessTask,
    ReaderTask,
    Target,
    TaskFailed,
    TaskFinished,
)

# Importing the adapter here makes the forkserver preload nnunetv2 once for every worker it forks.
from . import (
    nnunet,  # noqa: E402
    samples,
    validate,
)
from .files import file_stats, hash_input, input_digest, stage_files, staged_file, stat_input
from .process import die_with_parent, peak_rss, release_memory, reset_peak_rss, rss_now


def _validating(case: str, images: list[str], label: str, dataset_json: dict[str, Any],
               observed: Optional[dict[str, Any]] = None, capture: Optional[readcache.Capture] = None
               ) -> Callable[[type], type]:
    return lambda cls: validate.validating_reader(cls, case, images, label, dataset_json, observed, capture)


def case_warnings(case: str, images: list[str], label: str, dataset_json: dict[str, Any], reader: str,
                  observed: dict[str, Any]) -> tuple[CaseWarning, ...]:
    """What nnU-Net accepts but alters or ignores in this case (validate.py): what the validating reader observed,
    channel files numbered with a gap, and NaN or infinities the reader hides."""
    warnings: list[CaseWarning] = list(observed.get("warnings", []))
    if "dataset" not in dataset_json:
        numbering = validate.channel_numbering(images, dataset_json.get("file_ending", ""))
        if numbering:
            warnings.append(CaseWarning("channel_numbering", images[0],
                                        f"case {case} ({os.path.dirname(images[0])}): {numbering}"))
    for role, path in [*(("image", p) for p in images), ("label", label)]:
        w = validate.hidden_non_finite(case, path, role, reader)
        if w is not None:
            warnings.append(w)
    if reader == "Tiff3DIO":
        warnings += validate.missing_tiff_spacing(case, images[0], label)
    return tuple(warnings)


def inspect_case(case: str, images: list[str], label: str, dataset_json: dict[str, Any],
                 reader: str) -> tuple[CaseWarning, ...]:
    """Reads a case through the validating reader as the fingerprint stage does (for `nnresume check --full`);
    raises CaseError for what fails the case, returns the warnings."""
    validate.before_read(case, images, label, dataset_json)
    observed: dict[str, Any] = {}
    cls = validate.validating_reader(nnunet.reader_writer(reader), case, images, label, dataset_json, observed)

    def read() -> None:
        rw = cls()
        rw.read_images(list(images))
        rw.read_seg(label)

    validate.wrap_nnunet_errors(case, "read", images, label, read)
    return case_warnings(case, images, label, dataset_json, reader, observed)


def run_fingerprint(task: FingerprintTask, send: Callable[[Any], None]) -> None:
    t0 = time.time()
    known = {f.path: f for f in task.known}
    files = []
    for role, channel, path in task.files:
        st = stat_input(task.case, path)
        k = known.get(path)
        same_stat = k is not None and k.size == st.st_size and k.mtime_ns == st.st_mtime_ns
        digest = k.digest if k is not None and same_stat else hash_input(task.case, path)
        files.append(InputFileInfo(role, channel, path, st.st_size, st.st_mtime_ns, digest))
    digest = input_digest(files)
    if task.reuse_if_unchanged and task.known and digest == input_digest(list(task.known)):
        send(FingerprintResult(task.case, tuple(files), digest, unchanged=True, duration_s=time.time() - t0))
        return

    images = [p for r, _, p in task.files if r == "image"]
    label = next(p for r, _, p in task.files if r == "label")
    validate.before_read(task.case, images, label, task.dataset_json)
    observed: dict[str, Any] = {}
    capture = readcache.Capture(task.read_cache) if task.read_cache else None
    wrap = _validating(task.case, images, label, task.dataset_json, observed, capture)
    kept: list[Any] = []
    result = validate.wrap_nnunet_errors(
        task.case, "fingerprint", images, label,
        lambda: nnunet.analyze_case(task.extractor, images, label, task.reader_writer, task.num_samples, wrap, kept))
    # whether the samples for fewer per case (a dataset that grew) can be made from what is stored (samples.py)
    derivable = len(kept) == len(result[2]) and samples.reproduces(list(result[2]), kept, task.num_samples)
    for f in files:
        st = stat_input(task.case, f.path)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise InputChangedError(task.case, "file changed while it was being read", f.path,
                                    "rerun once the file is complete")
    if capture is not None:
        capture.save(task.reader_writer, file_stats(files))
    name = f"{task.case}.fingerprint"

    # what aggregation needs before it reads the samples: their lengths and dtypes per channel
    summary = [(len(p), str(np.asarray(p).dtype)) for p in result[2]]

    def write(prefix: str) -> None:
        with open(prefix + ".fingerprint", "wb") as fh:
            fh.write(blobs.dumps((result, kept if derivable else None), summary))

    (staged,) = stage_files(task.staging, task.case, [name], write)
    shape_after_crop, spacing = result[0], result[1]
    # the case as the reader returned it: what the preprocessing stage's memory estimate starts from
    header = dict(geometry.read_header(images[0]) or {})
    if "shape" in observed:
        header["reader_shape"] = [int(s) for s in observed["shape"]]
        header["reader_spacing"] = [float(s) for s in observed["spacing"]]
    send(FingerprintResult(task.case, tuple(files), digest, unchanged=False, result=staged,
                           shape_after_crop=[int(s) for s in shape_after_crop], spacing=[float(s) for s in spacing],
                           header=header, derivable=derivable, duration_s=time.time() - t0, peak_rss=peak_rss(),
                           warnings=case_warnings(task.case, images, label, task.dataset_json,
                                                           task.reader_writer, observed)))


def run_preprocess(task: PreprocessTask, send: Callable[[Any], None]) -> None:
    for f in task.expected:
        st = stat_input(task.case, f.path)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise InputChangedError(task.case, "file changed after its fingerprint was taken", f.path,
                                    "rerun: the case will be fingerprinted and preprocessed again")
    needs_read = any(t.data_identifier != dataset.GT_IDENTIFIER for t in task.targets_)
    validate.before_read(task.case, list(task.images), task.label, task.dataset_json)
    read = None
    if needs_read and task.read_cache:
        read = readcache.load(task.read_cache, nnunet.plans_reader_writer_name(task.plans),
                              file_stats(task.expected))
    if needs_read and read is None:
        wrap = _validating(task.case, list(task.images), task.label, task.dataset_json)
        read = validate.wrap_nnunet_errors(task.case, "read", list(task.images), task.label,
                                           lambda: nnunet.read_case(task.plans, list(task.images), task.label, wrap))
    for f in task.expected:
        st = stat_input(task.case, f.path)
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise InputChangedError(task.case, "file changed while it was being read", f.path)

    ending = task.dataset_json["file_ending"]
    for i, target in enumerate(task.targets_):
        reset_peak_rss()
        t0 = time.time()
        staging = f"{task.staging}.{i}-{target.data_identifier}"
        names = dataset.output_names(task.case, target.data_identifier, ending)
        if target.data_identifier == dataset.GT_IDENTIFIER:
            def write(prefix: str, target: Target = target) -> None:
                shutil.copy2(task.label, prefix + ending)
        else:
            def write(prefix: str, target: Target = target) -> None:
                validate.wrap_nnunet_errors(
                    task.case, target.configuration, list(task.images), task.label,
                    lambda: nnunet.preprocess_configuration(task.plans, target.configuration, task.dataset_json,
                                                            list(task.images), task.label, prefix, read))
        staged = stage_files(staging, task.case, names, write)
        send(OutputResult(task.case, target, staged, time.time() - t0, peak_rss()))


DISK_FULL_BELOW = 16 << 20


def _disk_full(path: str) -> bool:
    """blosc2 reports a full disk as a bare RuntimeError; the free space says what happened."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or "/").free < DISK_FULL_BELOW
    except OSError:
        return False


def run_aggregate(task: AggregateTask, send: Callable[[Any], None]) -> None:
    # each case's result was made for n samples per case, n >= the dataset's count now (task.num_samples)
    def summary(i: int) -> list[tuple[int, str]]:
        return [(min(length, task.num_samples), dtype) for length, dtype in blobs.read_summary(task.results[i][1])]

    def load(i: int) -> tuple:
        case, path, sha, made_for = task.results[i]
        with open(path, "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise CaseError(case, "its fingerprint result does not match the checksum the ledger recorded", path,
                            "run the same command again: the case is fingerprinted again")
        result, kept = blobs.loads(blob)
        return samples.for_count(result, kept, made_for, task.num_samples)

    def memory_left() -> int:
        # the tree may grow by what the orchestrator found free under the budget, less this worker's growth so far
        return int((task.memory_room - max(0, rss_now() - started_rss)) * 0.8)

    started_rss = rss_now()
    fingerprint = nnunet.aggregate_fingerprint(summary, load, len(task.results), task.dataset_json,
                                               memory_left if task.memory_room else None)
    os.makedirs(task.staging_dir, exist_ok=True)
    path = os.path.join(task.staging_dir, "dataset_fingerprint.json")
    nnunet.write_fingerprint(fingerprint, path)
    send(DatasetResult(staged=staged_file(path), peak_rss=peak_rss()))


def run_plan(task: PlanTask, send: Callable[[Any], None]) -> None:
    identifier, staged = nnunet.plan(task.dataset_name, task.planner, task.gpu_memory_target,
                                     task.preprocessor_name, task.overwrite_target_spacing, task.overwrite_plans_name,
                                     task.staging_dir, task.reader_writer)
    send(DatasetResult(value=identifier, staged=staged_file(staged), peak_rss=peak_rss()))


def run_task(task: Any, send: Callable[[Any], None]) -> None:
    """Runs a task and reports its outcome through `send`. Never raises for a case's own failure."""
    t0 = time.time()
    crashpoints.start_task(task.case, task.stage)
    staging = getattr(task, "staging", None) or getattr(task, "staging_dir", None) or "/"  # case or dataset task
    per_case = (FingerprintTask, PreprocessTask, PredictTask)
    who = f"case {task.case}" if isinstance(task, per_case) else f"{task.stage} step"
    try:
        if isinstance(task, FingerprintTask):
            run_fingerprint(task, send)
        elif isinstance(task, PreprocessTask):
            run_preprocess(task, send)
        elif isinstance(task, PredictTask):
            from .inference.case import run_predict  # torch's inference code only in workers that predict

            run_predict(task, send)
        elif isinstance(task, ReaderTask):
            send(DatasetResult(value=nnunet.reader_writer_name(task.dataset_json, list(task.examples))))
        elif isinstance(task, AggregateTask):
            run_aggregate(task, send)
        elif isinstance(task, PlanTask):
            run_plan(task, send)
        elif isinstance(task, InspectTask):
            warnings = inspect_case(task.case, list(task.images), task.label, task.dataset_json, task.reader_writer)
            send(InspectResult(task.case, warnings, peak_rss()))
        elif isinstance(task, ClassCheckTask):
            nnunet.check_class_names(task.planner, task.fingerprint_extractor, task.preprocessor)
            send(DatasetResult(value="ok"))
        elif isinstance(task, IntegrityTask):
            nnunet.verify_dataset_integrity(task.raw_folder, task.num_processes)
            send(DatasetResult(value="ok"))
        else:
            raise TypeError(f"unknown task {task!r}")
    except CaseError as e:
        if _disk_full(staging):
            send(TaskFailed(task.case, task.targets, "disk",
                            f"{who}: no space left on device writing {staging} ({e.message})"))
        else:
            send(TaskFailed(task.case, task.targets, "case", e.one_line()))
        return
    except NnresumeError as e:  # a dataset-level task's own error (no reader fits, a planner not found)
        send(TaskFailed(task.case, task.targets, "dataset", e.message, error=type(e).__name__, hint=e.hint))
        return
    except MemoryError:
        send(TaskFailed(task.case, task.targets, "memory",
                        f"{who}: out of memory (MemoryError) in {task.stage}", traceback.format_exc()))
        return
    except OSError as e:
        kind = "disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(staging) else "case"
        where = f" ({e.filename})" if e.filename else ""
        send(TaskFailed(task.case, task.targets, kind,
                        f"{who}{where}: {e.strerror or e} during {task.stage}", traceback.format_exc()))
        return
    except Exception as e:  # an nnU-Net error we did not anticipate: report it with the traceback
        if _disk_full(staging):
            send(TaskFailed(task.case, task.targets, "disk", f"{who}: no space left on device writing "
                                                             f"{staging} ({type(e).__name__}: {e})"))
            return
        send(TaskFailed(task.case, task.targets, "case",
                        f"{who}: {type(e).__name__}: {e} ({task.stage})", traceback.format_exc()))
        return
    send(TaskFinished(time.time() - t0, peak_rss()))


def companion_main(kind: str, conn: Any, *args: Any) -> None:
    """Entry point of a process started beside the workers to serve them (execution/pools/local.py); it ends when
    `conn` closes. "device": prediction's device process (inference/device.py)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if kind != "device":
        raise ValueError(f"unknown companion {kind!r}")
    from .inference.device import serve  # torch's inference code only in the process that predicts

    serve(conn, *args)


def worker_loop(conn: Any) -> None:
    """Entry point of a worker process: runs the tasks it is sent, one at a time, until it is sent None (or its
    pipe closes: the orchestrator is gone)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    base_rss = rss_now()
    try:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            reset_peak_rss()
            try:
                run_task(task, conn.send)
            except (BrokenPipeError, ConnectionResetError):
                return  # the orchestrator is gone (killed): nobody is left to tell
            release_memory(base_rss)
    finally:
        conn.close()
