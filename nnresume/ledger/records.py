"""The plain dataclasses the ledger's operations take and return, never ORM objects: a case with its fingerprint
and outputs, a run, an attempt, a finding, a memory sample, a configuration, an artifact, and the rows `status` shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..tasks import InputFileInfo
from .models import RunStatus, TaskState


@dataclass
class FingerprintRecord:
    state: TaskState
    key: Optional[str]
    input_digest: Optional[str]
    result_file: Optional[str]
    result_size: Optional[int]
    result_sha256: Optional[str]
    shape_after_crop: Optional[list[Any]]
    spacing: Optional[list[Any]]
    attempts: int
    deaths: int
    duration_s: Optional[float]
    peak_rss: Optional[int]
    estimate_bytes: Optional[int]
    error: Optional[str]
    attempt_key: Optional[str] = None


@dataclass
class OutputRecord:
    case: str
    data_identifier: str
    configuration: str
    state: TaskState
    config_hash: Optional[str]
    input_digest: Optional[str]
    files: Optional[list[dict[str, Any]]]
    attempts: int
    deaths: int
    duration_s: Optional[float]
    peak_rss: Optional[int]
    estimate_bytes: Optional[int]
    error: Optional[str]
    updated_at: float


@dataclass
class CaseRecord:
    name: str
    input_digest: Optional[str]
    header: Optional[dict[str, Any]]
    files: list[InputFileInfo] = field(default_factory=list)
    fingerprint: Optional[FingerprintRecord] = None
    outputs: dict[str, OutputRecord] = field(default_factory=dict)


@dataclass
class RunRecord:
    id: int
    command: str
    started_at: float
    ended_at: Optional[float]
    status: RunStatus
    end_reason: Optional[str]
    arguments: dict[str, Any]
    host: str
    pid: int
    pid_started_at: Optional[float]
    nnunetv2_version: str
    nnresume_version: str
    workers: Optional[int]
    budget_bytes: Optional[int]
    peak_tree_rss: Optional[int]
    log_file: Optional[str]


@dataclass
class ArtifactRecord:
    name: str
    key: str
    size: int
    sha256: str
    details: Optional[dict[str, Any]]
    updated_at: float


@dataclass
class ConfigurationRecord:
    data_identifier: str
    configuration: str
    plans_identifier: str
    config_hash: str
    # the hashes outputs were keyed on before (dataset.earlier_config_hashes), computed from the current plans; not
    # stored
    earlier_hashes: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        """The config hashes an output may be keyed on to be up to date."""
        return (self.config_hash, *self.earlier_hashes)


@dataclass
class AttemptRecord:
    run_id: int
    case_name: str
    stage: str
    targets: list[str]
    started_at: float
    ended_at: float
    outcome: str
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    peak_rss: Optional[int] = None
    last_rss: Optional[int] = None
    estimate_bytes: Optional[int] = None
    budget_bytes: Optional[int] = None
    message: Optional[str] = None
    private_peak: Optional[int] = None


@dataclass
class StatusRows:
    """Counts and the few rows `status` lists (see Ledger.status_rows)."""

    n_cases: int
    fingerprint_counts: dict[str, int] = field(default_factory=dict)
    fingerprint_peaks: list[int] = field(default_factory=list)
    output_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    output_peaks: dict[str, list[int]] = field(default_factory=dict)
    output_largest: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # the 3 largest peaks, case
    output_durations: dict[str, list[float]] = field(default_factory=dict)
    fingerprint_failures: list[tuple[Any, ...]] = field(default_factory=list)  # (case id, name, state, error)
    output_failures: list[tuple[Any, ...]] = field(default_factory=list)  # (case id, name, ident, state, error)
    cases_complete: int = 0  # cases done in every data folder asked for
    ok_attempts: dict[str, tuple[int, float]] = field(default_factory=dict)  # stage -> (count, first start)


@dataclass
class FindingRecord:
    case: Optional[str]  # None: the dataset as a whole
    level: str  # "warning" or "error"
    kind: str
    path: Optional[str]
    message: str


@dataclass
class MemorySampleRecord:
    t: float
    tree_rss: int
    available: int
    budget: int
    running: int
