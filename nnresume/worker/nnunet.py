"""The adapter to nnU-Net v2 for preprocessing: with inference/ (prediction's), the only code that imports nnunetv2.

It runs nnU-Net's own classes (fingerprint extractor, reader/writers, planners, preprocessors, the blosc2 writer) on one
case at a time and never decides where a file ends up: callers give it staging paths, and the orchestrator moves
finished files into place. Two pieces of nnU-Net are re-expressed here because nnU-Net keeps them inside methods that
do more than we may do (`DatasetFingerprintExtractor.run` spawns its own pool and writes non-atomically;
`ExperimentPlanner.save_plans` writes non-atomically): the fingerprint aggregation and the plans merge are copied from
nnunetv2 2.8.1 line for line, and `tests/test_identity.py` checks the results against nnU-Net's own command.

Size: one module on purpose: all that preprocessing takes from nnU-Net (class lookup, readers, the fingerprint, its
aggregation copied from nnunetv2, planning, preprocessing) is here, so that what preprocessing needs of a new
nnunetv2 version is checked in one file.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from types import MethodType
from typing import Any, Optional

import nnunetv2
import nnunetv2.paths
import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.imageio.reader_writer_registry import (
    determine_reader_writer_from_dataset_json,
    recursive_find_reader_writer_by_name,
)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..errors import DatasetError, UsageError
from ..io import atomic
from .percentiles import percentile

log = logging.getLogger(__name__)


class _LogWriter(io.TextIOBase):
    """A file-like object that sends nnU-Net's prints to our log, line by line, at DEBUG."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.buffer_ = logger, ""

    def write(self, s: str) -> int:
        self.buffer_ += s
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if line.strip():
                self.logger.debug("nnU-Net: %s", line)
        return len(s)


@contextlib.contextmanager
def quiet() -> Any:
    """nnU-Net prints freely; inside this block its output goes to the debug log instead of the terminal."""
    writer = _LogWriter(log)
    with contextlib.redirect_stdout(writer):
        yield


@functools.cache
def find_class(folder: tuple[str, ...], name: str, module: str, what: str) -> type:
    """nnU-Net's lookup walks and imports its package folder: ~4 ms a call, once per worker rather than per task."""
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], *folder), name, current_module=module)
    if cls is None:
        raise UsageError(f"{what} class {name!r} not found in {module}",
                         f"it must be defined in a module below nnunetv2/{'/'.join(folder)}")
    return cls


def _skip_repeated_lookups() -> None:
    """Two lookups nnU-Net's per-case path repeats for every case, done once per worker instead; results unchanged.

    - `DefaultPreprocessor._normalize` finds each channel's normalization class by walking and importing
      nnunetv2/preprocessing/normalization, per channel and per case (~1 ms each): the lookup is memoised, keyed on
      its arguments, in this process only.
    - imageio's Pillow plugin, which nnU-Net's 2D reader uses, tries `import pillow_heif` twice per image it opens;
      when the package is not installed each failed import searches all of sys.path again (~0.5 ms). Marking the
      module absent in sys.modules makes the import fail at once, exactly as it would have. Nothing is done when the
      package is installed.
    """
    import importlib.util
    import sys

    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    original = default_preprocessor.recursive_find_python_class
    if not hasattr(original, "cache_info"):
        default_preprocessor.recursive_find_python_class = functools.cache(original)
    if "pillow_heif" not in sys.modules and importlib.util.find_spec("pillow_heif") is None:
        sys.modules["pillow_heif"] = None  # type: ignore[assignment]


_skip_repeated_lookups()


def fingerprint_extractor_class(name: str) -> type:
    return find_class(("experiment_planning",), name, "nnunetv2.experiment_planning", "fingerprint extractor")


def planner_class(name: str) -> type:
    return find_class(("experiment_planning",), name, "nnunetv2.experiment_planning", "experiment planner")


def preprocessor_class(name: str) -> type:
    return find_class(("preprocessing",), name, "nnunetv2.preprocessing", "preprocessor")


_CLASS_PLACES = {
    "experiment planner": (("experiment_planning",), "nnunetv2.experiment_planning", "ExperimentPlanner", "-pl"),
    "fingerprint extractor": (("experiment_planning",), "nnunetv2.experiment_planning", "DatasetFingerprintExtractor",
                              "-fpe"),
    "preprocessor": (("preprocessing",), "nnunetv2.preprocessing", "DefaultPreprocessor", "-preprocessor_name"),
}


def _classes_below(folder: tuple[str, ...], module: str, base_name: str) -> list[str]:
    """Names of the subclasses of nnU-Net's base class in the modules nnU-Net searches (for suggestions)."""
    import importlib
    import inspect
    import pkgutil

    found: dict[str, type] = {}
    for info in pkgutil.walk_packages([os.path.join(nnunetv2.__path__[0], *folder)], prefix=module + "."):
        try:
            m = importlib.import_module(info.name)
        except Exception:  # a module that does not import is nnU-Net's concern, not a suggestion
            continue
        found.update(inspect.getmembers(m, inspect.isclass))
    base = found.get(base_name)
    return sorted(n for n, c in found.items() if base is None or issubclass(c, base))


def _find(name: str, folder: tuple[str, ...], module: str) -> Optional[type]:
    return recursive_find_python_class(os.path.join(nnunetv2.__path__[0], *folder), name, current_module=module)


def check_class_names(planner: str, extractor: str, preprocessor: str) -> None:
    """Every class named on the command line exists where nnU-Net looks for it; else one UsageError for all."""
    import difflib

    problems, hints = [], []
    with quiet():
        for what, name in (("experiment planner", planner), ("fingerprint extractor", extractor),
                           ("preprocessor", preprocessor)):
            folder, module, base, flag = _CLASS_PLACES[what]
            if name == base or _find(name, folder, module) is not None:
                continue
            problems.append(f"{flag} {name}: no {what} class of that name in {module}")
            near = difflib.get_close_matches(name, _classes_below(folder, module, base), n=3, cutoff=0.5)
            hints.append(f"{flag}: did you mean {' or '.join(near)}?" if near else
                         f"{flag}: the class must be defined in a module below nnunetv2/{'/'.join(folder)}")
    if problems:
        raise UsageError("; ".join(problems), "; ".join(hints))


def reader_writer_name(dataset_json: dict[str, Any], example_files: list[str]) -> str:
    """The reader/writer nnU-Net picks for this dataset.

    nnU-Net tries the readers for the file ending on the first case's first image. When that one file is corrupt,
    nnU-Net fails the whole run; here the next case's image is tried, so the corrupt case fails on its own.
    """
    last: Exception | None = None
    with quiet(), contextlib.redirect_stderr(_LogWriter(log)):
        for example_file in example_files:
            try:
                return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False).__name__
            except RuntimeError as e:
                last = e
    raise DatasetError(f"no nnU-Net reader can open the images of this dataset ({last})",
                       "check file_ending in dataset.json and that the files are valid images")


@functools.cache
def reader_writer(name: str) -> type:
    """nnU-Net's lookup of a reader/writer class by name walks nnunetv2/imageio: once per worker, not per case."""
    return recursive_find_reader_writer_by_name(name)


# ---- fingerprint ------------------------------------------------------------------------------------------------

ReaderWrap = Optional[Callable[[type], type]]


def analyze_case(extractor: str, images: list[str], label: str, reader: str, num_samples: int,
                 wrap_reader: ReaderWrap = None, kept: Optional[list[Any]] = None) -> tuple:
    """One case's fingerprint, by the extractor class's own `analyze_case`.

    `wrap_reader` may substitute a subclass of the reader/writer class (nnresume's input checks). With `kept` (a
    list), where the class analyses as nnU-Net's own does, what each channel's samples for fewer cases can be made
    from is appended to it (samples.py): `collect_foreground_intensities` is wrapped for this call, its result
    unchanged, and the foreground it was given is looked at once more.
    """
    cls: Any = fingerprint_extractor_class(extractor)
    rw = reader_writer(reader)
    rw = wrap_reader(rw) if wrap_reader else rw
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    if kept is None or cls.analyze_case is not DatasetFingerprintExtractor.analyze_case:
        return cls.analyze_case(images, label, rw, num_samples)
    from . import samples

    original = DatasetFingerprintExtractor.__dict__["collect_foreground_intensities"]

    def collect(segmentation: np.ndarray, images: np.ndarray, seed: int = samples.SEED,
                num_samples: int = 10000) -> Any:
        out = original.__func__(segmentation, images, seed, num_samples)
        if seed == samples.SEED:
            mask = segmentation[0] > 0
            kept.extend(samples.keep(images[c][mask] if c else np.empty(0), c, num_samples)
                        for c in range(len(images)))
        return out

    DatasetFingerprintExtractor.collect_foreground_intensities = staticmethod(collect)
    try:
        return cls.analyze_case(images, label, rw, num_samples)
    finally:
        DatasetFingerprintExtractor.collect_foreground_intensities = original


def aggregate_fingerprint(summary: Callable[[int], list[tuple[int, str]]], load: Callable[[int], tuple],
                          num_cases: int, dataset_json: dict[str, Any],
                          memory_left: Optional[Callable[[], int]] = None) -> dict:
    """`DatasetFingerprintExtractor.run`'s aggregation (nnunetv2 2.8.1) over per-case results in nnU-Net's order.

    nnU-Net holds every case's samples, then their concatenation, then `np.array` of it: three copies of 10e7
    samples per channel. Here `summary(i)` gives the (length, dtype) of case i's samples per channel and `load(i)` the
    whole result; the samples are copied once into the array `np.array(concatenations)` would produce: same dtype
    (NumPy's promotion, e.g. to float64 when a case without foreground contributed `[]`), same values, same layout.
    The statistics below are nnU-Net's lines, unchanged (which is why this function is longer than most here: it
    reads side by side with nnunetv2's `DatasetFingerprintExtractor.run`).
    `memory_left()` says how many bytes the step may still add; with it, cases are loaded and statistics computed
    side by side as far as that memory allows (without it, one case at a time and one statistic per channel).
    """
    lengths: list[list[int]] = []
    dtypes: list[list[np.dtype]] = []
    for i in range(num_cases):
        pieces = summary(i)
        if i == 0:
            lengths, dtypes = [[] for _ in pieces], [[] for _ in pieces]
        for c in range(len(lengths)):
            lengths[c].append(pieces[c][0])
            dtypes[c].append(np.dtype(pieces[c][1]))
    totals = [sum(n) for n in lengths]
    if len(set(totals)) > 1:
        raise ValueError(f"channels have different numbers of foreground samples {totals}; nnU-Net cannot "
                         "aggregate this fingerprint")
    channel_dtypes = [np.result_type(*d) for d in dtypes]
    foreground_intensities_per_channel = np.empty((len(totals), totals[0] if totals else 0),
                                                  dtype=np.result_type(*channel_dtypes) if channel_dtypes else float)
    offsets = np.concatenate(([0], np.cumsum(lengths[0] if lengths else [0] * num_cases)))

    def place(i: int) -> tuple:
        r = load(i)
        for c, piece in enumerate(np.asarray(p) for p in r[2]):
            # the cast np.concatenate makes, then the one np.array makes
            foreground_intensities_per_channel[c, offsets[i]:offsets[i] + len(piece)] = piece.astype(
                channel_dtypes[c], copy=False)
        return r[0], r[1], r[4]

    # Each case's samples have their own place in the array, so cases are read, checked, decompressed and copied
    # side by side (file reads, hashing, LZ4 and NumPy's copies release the GIL) as far as memory allows: a reader
    # holds a case's file, its decompressed samples and their cast, and the array fills up as they go.
    largest_case = max(lengths[0], default=0) * sum(d.itemsize for d in channel_dtypes) if lengths else 0
    per_reader = 3 * max(1, largest_case)
    readers = 1 if memory_left is None else min(
        num_cases, len(os.sched_getaffinity(0)),
        (memory_left() - foreground_intensities_per_channel.nbytes) // per_reader)
    with ThreadPoolExecutor(max(1, readers)) as pool:
        shapes_after_crop, spacings, relative_sizes = (list(x) for x in zip(*pool.map(place, range(num_cases))))

    # from here on nnunetv2 2.8.1's lines
    median_relative_size_after_cropping = np.median(relative_sizes, 0)
    num_channels = len(dataset_json['channel_names'].keys()
                       if 'channel_names' in dataset_json.keys()
                       else dataset_json['modality'].keys())
    percentiles = np.array((0.5, 50.0, 99.5))

    def channel_percentiles(i: int) -> Any:  # np.percentile's result, sooner (see percentiles.py)
        return percentile(foreground_intensities_per_channel[i], percentiles)

    def channel_moments(i: int) -> tuple[float, float, float, float]:
        return (float(np.mean(foreground_intensities_per_channel[i])),
                float(np.std(foreground_intensities_per_channel[i])),
                float(np.min(foreground_intensities_per_channel[i])),
                float(np.max(foreground_intensities_per_channel[i])))

    # nnU-Net computes the channels one after the other. The calls are independent and release the GIL, so the
    # step, which runs alone, uses the machine's other cores: the percentiles (the long calls) first, then the
    # moments, each on the same array as nnU-Net's: the results are the same. A call may hold a temporary the size
    # of its channel (np.std's deviations; np.percentile's copy where percentiles.py falls back to it), so the
    # memory left bounds how many run at once.
    jobs = min(2 * num_channels, len(os.sched_getaffinity(0)))
    if memory_left is not None:
        jobs = min(jobs, memory_left() // max(1, foreground_intensities_per_channel[0].nbytes if num_channels else 1))
    else:
        jobs = min(jobs, num_channels)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        percentile_futures = [pool.submit(channel_percentiles, i) for i in range(num_channels)]
        moment_futures = [pool.submit(channel_moments, i) for i in range(num_channels)]
        intensity_statistics_per_channel = {}
        for i in range(num_channels):
            percentile_00_5, median, percentile_99_5 = percentile_futures[i].result()
            mean, std, mini, maxi = moment_futures[i].result()
            intensity_statistics_per_channel[i] = {
                'mean': mean,
                'median': float(median),
                'std': std,
                'min': mini,
                'max': maxi,
                'percentile_99_5': float(percentile_99_5),
                'percentile_00_5': float(percentile_00_5),
            }
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes_after_crop,
        'foreground_intensity_properties_per_channel': intensity_statistics_per_channel,
        "median_relative_size_after_cropping": median_relative_size_after_cropping
    }


def write_fingerprint(fingerprint: dict[str, Any], path: str) -> None:
    """Written with nnU-Net's own `save_json`, so the file is byte-identical to the one nnU-Net writes."""
    save_json(fingerprint, path)


# ---- planning -----------------------------------------------------------------------------------------------------

def _staged_save_plans(staging: str, written: list[str]) -> Callable[[Any, dict], None]:
    def save_plans(self: Any, plans: dict) -> None:
        # ExperimentPlanner.save_plans from nnunetv2 2.8.1, writing into staging; the orchestrator moves it in place
        recursive_fix_for_json_export(plans)
        plans_file = os.path.join(str(nnunetv2.paths.nnUNet_preprocessed), self.dataset_name,
                                  self.plans_identifier + '.json')
        if os.path.isfile(plans_file):
            old_plans = load_json(plans_file)
            old_configurations = old_plans['configurations']
            for c in plans['configurations'].keys():
                if c in old_configurations.keys():
                    del (old_configurations[c])
            plans['configurations'].update(old_configurations)
        os.makedirs(staging, exist_ok=True)
        staged = os.path.join(staging, self.plans_identifier + '.json')
        save_json(plans, staged, sort_keys=False)
        atomic.fsync_file(staged)
        written.append(staged)
    return save_plans


@contextlib.contextmanager
def _one_pass_case_listing() -> Any:
    """The planner lists cases with nnU-Net's quadratic matcher in a pool of 12 forked processes; for large datasets
    that takes minutes. `dataset.list_cases` gives the same result in one pass (tests/test_dataset.py)."""
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as dep

    from ..dataset import list_cases

    def listing(raw_dataset_folder: str, dataset_json: Optional[dict] = None) -> dict:
        if dataset_json is None:
            dataset_json = load_json(os.path.join(raw_dataset_folder, 'dataset.json'))
        return {k: {'images': list(v.images), 'label': v.label}
                for k, v in list_cases(Path(raw_dataset_folder), dataset_json).items()}

    original = dep.get_filenames_of_train_images_and_targets
    dep.get_filenames_of_train_images_and_targets = listing
    try:
        yield
    finally:
        dep.get_filenames_of_train_images_and_targets = original


def plan(dataset_name: str, planner: str, gpu_memory_target: Optional[float], preprocessor_name: str,
         overwrite_target_spacing: Optional[tuple[float, ...]], overwrite_plans_name: Optional[str],
         staging: str, reader_writer_name: Optional[str] = None) -> tuple[str, str]:
    """Runs the planner as `plan_experiment_dataset` does; returns the plans identifier and the staged plans file.

    The plans JSON is written into `staging` (merged with the existing plans file, as nnU-Net merges). The planner
    also copies dataset.json (and splits_final.json) into the preprocessed folder with plain copies; the caller
    rewrites dataset.json atomically afterwards. With
    `reader_writer_name`, the planner records that reader instead of trying to open the first case again (which
    fails the whole planning when that one case is corrupt).
    """
    cls = planner_class(planner)
    kwargs: dict[str, Any] = {}
    if overwrite_plans_name is not None:
        kwargs['plans_name'] = overwrite_plans_name
    if gpu_memory_target is not None:
        kwargs['gpu_memory_target_in_gb'] = gpu_memory_target
    with quiet(), _one_pass_case_listing():
        instance = cls(dataset_name, preprocessor_name=preprocessor_name,
                       overwrite_target_spacing=[float(i) for i in overwrite_target_spacing]
                       if overwrite_target_spacing is not None else overwrite_target_spacing,
                       suppress_transpose=False, **kwargs)
        written: list[str] = []
        instance.save_plans = MethodType(_staged_save_plans(staging, written), instance)
        if reader_writer_name is not None:
            chosen = reader_writer(reader_writer_name)
            instance.determine_reader_writer = lambda: chosen
        instance.plan_experiment()
    return instance.plans_identifier, written[-1]


def verify_dataset_integrity(raw_folder: str, num_processes: int) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as verify

    try:
        with quiet():
            verify(raw_folder, num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise DatasetError(f"nnU-Net's dataset integrity check failed for {raw_folder}: {e}") from None


# ---- preprocessing ------------------------------------------------------------------------------------------------

def plans_reader_writer_name(plans: dict[str, Any]) -> str:
    """The name of the reader/writer class `DefaultPreprocessor.run_case` reads with for these plans (PlansManager
    finds the class by this name)."""
    return str(plans.get("image_reader_writer"))


_MANAGERS: dict[str, tuple[PlansManager, dict[str, Any]]] = {}


def _managers(plans: dict[str, Any]) -> tuple[PlansManager, dict[str, Any]]:
    """One PlansManager per plans in a worker, and one ConfigurationManager per configuration of it, as
    `DefaultPreprocessor.run` makes them once for all cases: a ConfigurationManager caches its resampling functions,
    which nnU-Net finds by walking nnunetv2/preprocessing/resampling (0.9 ms a case when made per case)."""
    key = json.dumps(plans, sort_keys=True)
    if key not in _MANAGERS:
        if len(_MANAGERS) >= 4:
            _MANAGERS.clear()
        _MANAGERS[key] = (PlansManager(plans), {})
    return _MANAGERS[key]


def _configuration_manager(plans: dict[str, Any], configuration: str) -> tuple[PlansManager, Any]:
    plans_manager, configurations = _managers(plans)
    if configuration not in configurations:
        configurations[configuration] = plans_manager.get_configuration(configuration)
    return plans_manager, configurations[configuration]


def read_case(plans: dict[str, Any], images: list[str], label: str,
              wrap_reader: ReaderWrap = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """What `DefaultPreprocessor.run_case` reads, read once for all configurations of a case."""
    cls = _managers(plans)[0].image_reader_writer_class
    rw = (wrap_reader(cls) if wrap_reader else cls)()
    data, properties = rw.read_images(images)
    seg, _ = rw.read_seg(label)
    return data, seg, properties


def preprocess_configuration(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any],
                             images: list[str], label: str, output_prefix: str,
                             read: Optional[tuple[np.ndarray, np.ndarray, dict]]) -> None:
    """Writes `<output_prefix>.b2nd`, `_seg.b2nd` and `.pkl` with the configuration's preprocessor's `run_case_save`.

    When the preprocessor reads cases the default way, `read` (the case already read by `read_case`) stands in for
    reading the files again; `run_case_npy` copies its inputs, so one read serves every configuration. A preprocessor
    with its own `run_case` reads for itself.
    """
    plans_manager, configuration_manager = _configuration_manager(plans, configuration)
    preprocessor = preprocessor_class(configuration_manager.preprocessor_name)(verbose=False)
    if read is not None and type(preprocessor).run_case is DefaultPreprocessor.run_case:
        data, seg, properties = read

        def run_case(self: Any, image_files: Any, seg_file: Any, pm: Any, cm: Any, dj: Any) -> tuple:
            return self.run_case_npy(data, seg, deepcopy(properties), pm, cm, dj)

        preprocessor.run_case = MethodType(run_case, preprocessor)
    with quiet():
        preprocessor.run_case_save(output_prefix, images, label, plans_manager, configuration_manager, dataset_json)


def data_identifier(plans: dict[str, Any], configuration: str) -> str:
    return PlansManager(plans).get_configuration(configuration).data_identifier


