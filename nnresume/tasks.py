"""What the orchestrator sends to a worker and what comes back: plain, picklable dataclasses.

This is the whole contract between the orchestrator and whatever runs cases (local processes today). A task names
its inputs and a staging folder; results name staged files with their size and checksum. Workers never write the
ledger and never write into a configuration folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass(frozen=True)
class InputFileInfo:
    role: str  # "image" or "label"
    channel: int  # -1 for the label
    path: str
    size: int
    mtime_ns: int
    digest: str


@dataclass(frozen=True)
class CaseWarning:
    """Something nnU-Net accepts but alters or ignores without a word (NaN read as 0, image and label not aligned, a
    label with only background). The case is preprocessed as nnU-Net would; the warning is kept in the ledger."""

    kind: str  # non_finite_in_file, geometry, background_only, label_channels, channel_numbering, channels_geometry
    path: str
    message: str  # one line, naming the case and the file


@dataclass(frozen=True)
class StagedFile:
    name: str  # final file name in its data folder
    staged_path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Target:
    data_identifier: str
    configuration: str  # "gt_segmentations" for the label copy


@dataclass(frozen=True)
class FingerprintTask:
    task_id: str
    case: str
    files: tuple[tuple[str, int, str], ...]  # (role, channel, path)
    extractor: str
    reader_writer: str
    num_samples: int
    staging: str  # this attempt's name in the run's staging folder: its files are staged as `<staging>.<name>`
    dataset_json: dict[str, Any] = field(default_factory=dict)
    known: tuple[InputFileInfo, ...] = ()  # the ledger's view; files whose stat matches are not hashed again
    reuse_if_unchanged: bool = False  # the ledger's result is valid if the content is unchanged
    read_cache: str = ""  # where to keep the case as read, for this run's preprocessing (io/readcache.py)

    @property
    def stage(self) -> str:
        return "fingerprint"

    @property
    def targets(self) -> list[str]:
        return ["fingerprint"]


@dataclass(frozen=True)
class PreprocessTask:
    task_id: str
    case: str
    images: tuple[str, ...]
    label: str
    expected: tuple[InputFileInfo, ...]  # what the fingerprint stage hashed; any change aborts the task
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    targets_: tuple[Target, ...]
    staging: str  # this attempt's name in the run's staging folder: its files are staged as `<staging>.<name>`
    read_cache: str = ""  # the case as the fingerprint stage read it, if it is there (io/readcache.py)

    @property
    def stage(self) -> str:
        return "preprocess"

    @property
    def targets(self) -> list[str]:
        return [t.data_identifier for t in self.targets_]


@dataclass(frozen=True)
class ReaderTask:
    """Which of nnU-Net's readers opens this dataset (it tries them on an example image)."""

    task_id: str
    dataset_json: dict[str, Any]
    examples: tuple[str, ...]
    case: str = "(dataset)"
    stage: str = "reader"

    @property
    def targets(self) -> list[str]:
        return ["reader"]


@dataclass(frozen=True)
class AggregateTask:
    """dataset_fingerprint.json from the per-case results, written into staging."""

    task_id: str
    # (case, path, sha256, the samples per case its result was made for) in nnU-Net's case order
    results: tuple[tuple[str, str, str, int], ...]
    dataset_json: dict[str, Any]
    staging_dir: str
    num_samples: int  # the samples per case for the dataset as it is (worker/samples.py: fewer made from more)
    memory_room: int = 0  # bytes the tree could still grow by under the budget when the task was sent; 0: unknown
    case: str = "(dataset)"
    stage: str = "aggregate"

    @property
    def targets(self) -> list[str]:
        return ["dataset_fingerprint.json"]


@dataclass(frozen=True)
class PlanTask:
    """The planner's plans JSON, written into staging (nnU-Net's planner itself copies dataset.json)."""

    task_id: str
    dataset_name: str
    planner: str
    gpu_memory_target: Optional[float]
    preprocessor_name: str
    overwrite_target_spacing: Optional[tuple[float, ...]]
    overwrite_plans_name: Optional[str]
    reader_writer: Optional[str]
    staging_dir: str
    case: str = "(dataset)"
    stage: str = "plan"

    @property
    def targets(self) -> list[str]:
        return ["plans"]


@dataclass(frozen=True)
class ClassCheckTask:
    """Whether the planner, fingerprint extractor and preprocessor classes named on the command line exist where
    nnU-Net looks for them; checked before any work."""

    task_id: str
    planner: str
    fingerprint_extractor: str
    preprocessor: str
    case: str = "(dataset)"
    stage: str = "classes"

    @property
    def targets(self) -> list[str]:
        return ["classes"]


@dataclass(frozen=True)
class InspectTask:
    """Read one case through the validating reader as the fingerprint stage would, and report its problems
    (`nnresume check --full`): an InspectResult with its warnings, or a TaskFailed with what fails the case."""

    task_id: str
    case: str
    images: tuple[str, ...]
    label: str
    dataset_json: dict[str, Any]
    reader_writer: str
    stage: str = "inspect"

    @property
    def targets(self) -> list[str]:
        return ["inspect"]


@dataclass(frozen=True)
class IntegrityTask:
    task_id: str
    raw_folder: str
    num_processes: int
    case: str = "(dataset)"
    stage: str = "integrity"

    @property
    def targets(self) -> list[str]:
        return ["integrity"]


@dataclass(frozen=True)
class ModelSpec:
    """A trained model as `nnresume predict` uses it: the folder nnU-Net's predictor loads, and the settings that
    change what it predicts. `key` is their digest (predict/model.py)."""

    folder: str
    folds: tuple[str, ...]
    checkpoint: str
    step_size: float
    disable_tta: bool
    save_probabilities: bool
    device: str
    key: str
    verbose: bool = False


@dataclass(frozen=True)
class DeviceLink:
    """How a prediction worker reaches the run's device process (worker/inference/device.py): its socket (an abstract
    Unix address, so nothing is left on disk), the key that admits only this run's workers, and the JSON file in which
    it says it is ready (its pid and the model's configuration) or why it could not load the model."""

    address: str
    authkey: bytes
    info: str


@dataclass(frozen=True)
class PredictTask:
    """One input case through nnU-Net's predictor: read, preprocess, sliding-window inference (in the device
    process), export, into staging. The result is an OutputResult for the target ("prediction", configuration)."""

    task_id: str
    case: str
    images: tuple[str, ...]
    expected: tuple[InputFileInfo, ...]  # what the orchestrator hashed; any change aborts the task
    model: ModelSpec
    target: Target
    num_channels: int  # what the model's dataset.json declares
    file_ending: str
    staging: str  # this attempt's name in the run's staging folder: its files are staged as `<staging>.<name>`
    device: DeviceLink  # the process that runs the sliding window for every worker
    stage: str = "predict"

    @property
    def targets(self) -> list[str]:
        return [self.target.data_identifier]


Task = Union[FingerprintTask, PreprocessTask, ReaderTask, AggregateTask, PlanTask, IntegrityTask, ClassCheckTask,
             InspectTask, PredictTask]


@dataclass(frozen=True)
class DatasetResult:
    """Result of a dataset-level task: a value (reader name, plans identifier) and/or a staged file."""

    value: Optional[str] = None
    staged: Optional[StagedFile] = None
    peak_rss: Optional[int] = None


@dataclass(frozen=True)
class FingerprintResult:
    case: str
    files: tuple[InputFileInfo, ...]
    input_digest: str
    unchanged: bool  # content hashed as the ledger had it and the ledger's result is still valid
    result: Optional[StagedFile] = None
    shape_after_crop: Optional[list[Any]] = None
    spacing: Optional[list[Any]] = None
    header: Optional[dict[str, Any]] = None
    derivable: bool = False  # its samples for fewer per case can be made from the stored result (worker/samples.py)
    duration_s: float = 0.0
    peak_rss: Optional[int] = None
    warnings: tuple[CaseWarning, ...] = ()


@dataclass(frozen=True)
class OutputResult:
    case: str
    target: Target
    files: tuple[StagedFile, ...]
    duration_s: float
    peak_rss: Optional[int]


@dataclass(frozen=True)
class InspectResult:
    case: str
    warnings: tuple[CaseWarning, ...]
    peak_rss: Optional[int] = None


@dataclass(frozen=True)
class TaskFailed:
    """A Python-level failure inside the worker. `kind` is "case" (bad input or an nnU-Net error for this case),
    "memory" (MemoryError: retried with more room) or "disk" (ENOSPC/EDQUOT: the run stops admitting)."""

    case: str
    targets: list[str]
    kind: str
    message: str
    traceback: str = ""
    error: str = ""  # the NnresumeError subclass raised in the worker, re-raised as such by the orchestrator
    hint: Optional[str] = None


@dataclass(frozen=True)
class TaskFinished:
    duration_s: float
    peak_rss: Optional[int]


Message = Union[FingerprintResult, OutputResult, DatasetResult, InspectResult, TaskFailed, TaskFinished]


@dataclass
class Death:
    """A worker that ended without saying it finished: killed by a signal, or exited abnormally."""

    exit_code: Optional[int]
    signal: Optional[int] = None
    killed_by_us: bool = False
    last_rss: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
