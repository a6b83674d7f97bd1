"""A raw dataset as nnU-Net sees it, read without importing nnunetv2.

Importing nnunetv2 costs about four seconds of CPU; `nnresume status` and a rerun with nothing to do must not pay it.
So the few nnU-Net conventions needed to decide what is up to date live here in plain Python: resolving a dataset id
to its folder name, listing the training cases, resolving a configuration's inheritance in the plans, and hashing a
configuration. `tests/test_dataset.py` checks each against nnU-Net's own function.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import DatasetError, UsageError

# Bump when nnresume changes how it writes outputs, so that older outputs are redone.
OUTPUT_FORMAT_VERSION = 1
GT_IDENTIFIER = "gt_segmentations"
LEDGER_NAME = "nnresume.sqlite"
WORK_DIR_NAME = ".nnresume"


@dataclass(frozen=True)
class CaseFiles:
    images: tuple[str, ...]
    label: str

    def all_files(self) -> list[tuple[str, int, str]]:
        """(role, channel, path) for every input file; channel is -1 for the label."""
        return [("image", i, p) for i, p in enumerate(self.images)] + [("label", -1, self.label)]


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's raw files, outputs, ledger and working files are."""

    name: str
    raw: Path
    preprocessed: Path

    @property
    def ledger(self) -> Path:
        return self.preprocessed / LEDGER_NAME

    @property
    def work(self) -> Path:
        return self.preprocessed / WORK_DIR_NAME

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def fingerprints(self) -> Path:
        return self.work / "fingerprints"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def lock(self) -> Path:
        return self.work / "lock"

    @property
    def fingerprint_json(self) -> Path:
        return self.preprocessed / "dataset_fingerprint.json"

    def data_folder(self, data_identifier: str) -> Path:
        return self.preprocessed / data_identifier


def nnunetv2_version() -> str:
    try:
        return metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        return "not installed"


def resolve_dataset_name(name_or_id: str, raw: str, preprocessed: str) -> str:
    """`001`, `1` or `Dataset001_Heart` to `Dataset001_Heart`, searching the folders nnU-Net searches."""
    text = str(name_or_id).strip()
    if text.startswith("Dataset"):
        return text
    try:
        dataset_id = int(text)
    except ValueError:
        raise UsageError(f"-d {text!r} is neither a dataset id nor a name starting with 'Dataset'",
                         "give the id (-d 1) or the folder name (-d Dataset001_Heart)") from None
    prefix = f"Dataset{dataset_id:03d}_"
    roots = [r for r in (preprocessed, raw, os.environ.get("nnUNet_results")) if r]
    candidates = sorted({d for root in roots if os.path.isdir(root) for d in os.listdir(root)
                         if d.startswith(prefix) and os.path.isdir(os.path.join(root, d))})
    if not candidates:
        raise UsageError(f"no dataset with id {dataset_id} in nnUNet_raw={raw or '(not set)'} or "
                         f"nnUNet_preprocessed={preprocessed}", f"expected a folder named {prefix}<name>")
    if len(candidates) > 1:
        raise UsageError(f"dataset id {dataset_id} is ambiguous: {', '.join(candidates)}",
                         "give the full dataset name with -d")
    return candidates[0]


def layout_for(name_or_id: str, raw: str, preprocessed: str) -> DatasetLayout:
    name = resolve_dataset_name(name_or_id, raw, preprocessed)
    return DatasetLayout(name=name, raw=Path(raw) / name, preprocessed=Path(preprocessed) / name)


def load_dataset_json(raw_folder: Path) -> dict[str, Any]:
    """Reads and checks dataset.json; every problem is a DatasetError naming the file."""
    path = raw_folder / "dataset.json"
    if not raw_folder.is_dir():
        raise UsageError(f"dataset folder {raw_folder} does not exist", "check nnUNet_raw and the -d argument")
    if not path.is_file():
        raise DatasetError(f"{path} is missing", "every nnU-Net dataset needs a dataset.json beside imagesTr/")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} must hold a JSON object")
    problems = []
    if "channel_names" not in content and "modality" not in content:
        problems.append("no 'channel_names'")
    for key in ("labels", "file_ending"):
        if key not in content:
            problems.append(f"no '{key}'")
    if "labels" in content and (not isinstance(content["labels"], dict) or "background" not in content["labels"]):
        problems.append("'labels' must be an object that includes 'background'")
    channels = content.get("channel_names", content.get("modality"))
    if channels is not None and (not isinstance(channels, dict) or not channels):
        problems.append("'channel_names' must be a non-empty object such as {\"0\": \"CT\"}")
    if problems:
        raise DatasetError(f"{path}: " + "; ".join(problems),
                           "see nnU-Net's documentation/dataset_format.md for the expected keys")
    return content


def num_channels(dataset_json: dict[str, Any]) -> int:
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def list_cases(raw_folder: Path, dataset_json: dict[str, Any]) -> dict[str, CaseFiles]:
    """The training cases, in nnU-Net's order, as `get_filenames_of_train_images_and_targets` lists them.

    nnU-Net matches every identifier against every file (quadratic, and it forks a pool to do so); grouping by the
    identifier each file name encodes gives the same result in one pass.
    """
    raw_folder = Path(raw_folder)
    if "dataset" in dataset_json:
        cases = {}
        for k, entry in dataset_json["dataset"].items():
            label = os.path.expandvars(entry["label"])
            label = label if os.path.isabs(label) else os.path.abspath(os.path.join(raw_folder, label))
            images = [os.path.expandvars(i) for i in entry["images"]]
            images = [i if os.path.isabs(i) else os.path.abspath(os.path.join(raw_folder, i)) for i in images]
            cases[k] = CaseFiles(tuple(images), label)
        return cases
    ending = dataset_json["file_ending"]
    images_dir = raw_folder / "imagesTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir} does not exist", "training images go in imagesTr/, labels in labelsTr/")
    crop = len(ending) + 5
    channel_suffix = re.compile(r"_\d\d\d\d" + re.escape(ending))
    grouped: dict[str, list[str]] = {}
    with os.scandir(images_dir) as it:
        names = sorted(e.name for e in it if e.name.endswith(ending) and e.is_file())
    # string concatenation, not os.path.join: this runs once per file (50,000 and more)
    images_prefix = os.path.join(images_dir, "")
    for name in names:
        identifier = name[:-crop]
        files = grouped.setdefault(identifier, [])
        if channel_suffix.fullmatch(name[len(identifier):]):
            files.append(images_prefix + name)
    labels_prefix = os.path.join(raw_folder, "labelsTr", "")
    return {k: CaseFiles(tuple(grouped[k]), labels_prefix + k + ending) for k in sorted(grouped)}


def orphan_labels(raw_folder: Path, dataset_json: dict[str, Any], cases: dict[str, CaseFiles]) -> dict[str, str]:
    """Label files in labelsTr without images in imagesTr (identifier -> label path). nnU-Net lists cases from their
    images, so it would leave these out without a word; its integrity check rejects the dataset."""
    if "dataset" in dataset_json:
        return {}
    ending = dataset_json["file_ending"]
    labels_dir = Path(raw_folder) / "labelsTr"
    if not labels_dir.is_dir():
        return {}
    with os.scandir(labels_dir) as it:
        names = sorted(e.name for e in it if e.name.endswith(ending) and not e.is_dir())
    return {n[:-len(ending)]: str(labels_dir / n) for n in names if n[:-len(ending)] not in cases}


def num_foreground_samples_per_case(num_cases: int) -> int:
    """nnU-Net's `DatasetFingerprintExtractor` draws 10e7 foreground voxels in all, split evenly over the cases."""
    return int(10e7 // num_cases)


def resolve_configuration(plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    """A configuration's dict with `inherits_from` resolved, as `PlansManager.get_configuration` resolves it."""
    configurations = plans["configurations"]
    chain: list[str] = []
    name = configuration
    while True:
        if name not in configurations:
            raise KeyError(name)
        if name in chain:
            raise DatasetError(f"circular 'inherits_from' in the plans: {' -> '.join(chain + [name])}")
        chain.append(name)
        parent = configurations[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    resolved: dict[str, Any] = {}
    for name in reversed(chain):
        resolved.update(json.loads(json.dumps(configurations[name])))
    return resolved


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# nnU-Net's normalisations that read nothing of the dataset's foreground intensity statistics: DefaultPreprocessor
# hands each channel's statistics to its normaliser, and of nnU-Net's own only CTNormalization uses them (a
# normalisation nnU-Net does not ship may, so its channel's statistics are kept in the hash).
STATISTICS_FREE_NORMALIZATIONS = frozenset({"ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                                            "RGBTo01Normalization"})
_STATISTICS_KEYS = ("foreground_intensity_properties_per_channel", "foreground_intensity_properties_by_modality")


def _statistics_read(plans: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """The foreground intensity statistics a configuration's preprocessing reads: every channel's with a
    preprocessor other than nnU-Net's DefaultPreprocessor, else those of the channels whose normalisation reads
    them. They change whenever a case is added (nnU-Net samples every case anew); a z-scored channel's outputs do
    not."""
    schemes = resolved.get("normalization_schemes") or []
    default = resolved.get("preprocessor_name", "DefaultPreprocessor") == "DefaultPreprocessor"

    def read(channel: str) -> bool:
        if not default or not channel.isdigit() or int(channel) >= len(schemes):
            return True
        return schemes[int(channel)] not in STATISTICS_FREE_NORMALIZATIONS

    out: dict[str, Any] = {}
    for key in _STATISTICS_KEYS:
        stats = plans.get(key)
        out[key] = ({c: v for c, v in stats.items() if read(str(c))} if isinstance(stats, dict) else stats)
    return out


# The configuration fields nnU-Net's DefaultPreprocessor reads (its configuration_manager properties, nnunetv2 2.8.1;
# patch_size sets the blosc2 chunks and blocks of the written arrays). The rest (batch size, the network's topology,
# the median image size) is for training, and the planner changes it as a dataset grows (the batch size of a small
# dataset is capped by its total size) without changing a preprocessed file. Another preprocessor class may read
# anything: its configuration is hashed whole.
PREPROCESSOR_FIELDS = frozenset({"data_identifier", "preprocessor_name", "spacing", "patch_size",
                                 "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                                 "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs"})


def _fields_read(resolved: dict[str, Any]) -> dict[str, Any]:
    if resolved.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        return resolved
    return {k: v for k, v in resolved.items() if k in PREPROCESSOR_FIELDS}


def _config_payload(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any], version: str,
                    plan_keys: tuple[str, ...], whole: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    resolved = resolve_configuration(plans, configuration)
    return resolved, {
        "format": OUTPUT_FORMAT_VERSION,
        "configuration": resolved if whole else _fields_read(resolved),
        "plans_identifier": plans.get("plans_name"),
        "preprocessor": resolved.get("preprocessor_name"),
        "nnunetv2": version,
        "labels": dataset_json.get("labels"),
        "regions_class_order": dataset_json.get("regions_class_order"),
        "plans": {k: plans.get(k) for k in plan_keys},
    }


def config_hash(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any], version: str) -> str:
    """What a configuration's outputs depend on besides the case's input files.

    The fields of the configuration's resolved dict that the preprocessor reads (`PREPROCESSOR_FIELDS`), the plans
    identifier, the preprocessor class, nnunetv2's version, the labels of dataset.json, and the plan-level fields the
    preprocessor reads (transpose, reader/writer, label manager, and the foreground intensity statistics of the
    channels whose normalisation reads them: `_statistics_read`).
    """
    resolved, payload = _config_payload(plans, configuration, dataset_json, version,
                                        ("transpose_forward", "image_reader_writer", "label_manager"), whole=False)
    return _digest({**payload, "statistics": _statistics_read(plans, resolved)})


def earlier_config_hashes(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any],
                          version: str) -> tuple[str, ...]:
    """The hashes outputs were keyed on before, computed from the current plans: with the whole configuration (before
    `config_hash` kept only what the preprocessor reads), and before that with every channel's statistics too. Each
    is stricter than `config_hash`, so an output keyed on one is as valid while it matches the current plans; a run
    rewrites such rows to the current hash."""
    resolved, payload = _config_payload(plans, configuration, dataset_json, version,
                                        ("transpose_forward", "image_reader_writer", "label_manager"))
    _, oldest = _config_payload(plans, configuration, dataset_json, version,
                                ("transpose_forward", "image_reader_writer", "label_manager", *_STATISTICS_KEYS))
    return _digest({**payload, "statistics": _statistics_read(plans, resolved)}), _digest(oldest)


def gt_hash(dataset_json: dict[str, Any]) -> str:
    return _digest({"format": OUTPUT_FORMAT_VERSION, "kind": GT_IDENTIFIER, "file_ending": dataset_json["file_ending"]})


def key_of(payload: Any) -> str:
    """A stable hash of a JSON-able value, for the ledger's keys."""
    return _digest(payload)


def output_names(case: str, data_identifier: str, file_ending: str) -> list[str]:
    """The files one case has in one data folder, in the order they are moved into place.

    The `.b2nd` data file comes last: nnU-Net's training finds cases by listing `*.b2nd`, so a case appears only
    once its properties and segmentation are in place.
    """
    if data_identifier == GT_IDENTIFIER:
        return [case + file_ending]
    return [case + ".pkl", case + "_seg.b2nd", case + ".b2nd"]
