"""The ledger's tables. The schema is created and changed only by the Alembic migrations in `migrations/`;
`tests/test_migrations.py` fails when these models and the migrations drift apart.

Timestamps are Unix seconds (floats): they are compared and subtracted far more often than they are displayed.
"""
from __future__ import annotations

import enum
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Enum, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class TaskState(str, enum.Enum):
    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"
    quarantined = "quarantined"


class RunStatus(str, enum.Enum):
    running = "running"
    completed = "completed"
    completed_with_failures = "completed_with_failures"
    interrupted = "interrupted"
    failed = "failed"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, int: BigInteger}


class TaskColumns:
    """What fingerprints and outputs both record about the work that makes them."""

    state: Mapped[TaskState] = mapped_column(_enum(TaskState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    deaths: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[Optional[float]] = mapped_column(Float)
    peak_rss: Mapped[Optional[int]]
    estimate_bytes: Mapped[Optional[int]]
    error: Mapped[Optional[str]] = mapped_column(Text)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    updated_at: Mapped[float] = mapped_column(Float)


class Run(Base):
    """One invocation of `nnresume preprocess` on one dataset."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[Optional[float]] = mapped_column(Float)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus))
    end_reason: Mapped[Optional[str]] = mapped_column(Text)
    arguments: Mapped[dict[str, Any]]
    nnunetv2_version: Mapped[str] = mapped_column(String(32))
    nnresume_version: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    pid_started_at: Mapped[Optional[float]] = mapped_column(Float)
    workers: Mapped[Optional[int]] = mapped_column(Integer)
    budget_bytes: Mapped[Optional[int]]
    peak_tree_rss: Mapped[Optional[int]]
    log_file: Mapped[Optional[str]] = mapped_column(Text)


class Case(Base):
    """A training case of the raw dataset, as last seen."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    input_digest: Mapped[Optional[str]] = mapped_column(String(64))
    header: Mapped[Optional[dict[str, Any]]]
    updated_at: Mapped[float] = mapped_column(Float)

    files: Mapped[list[InputFile]] = relationship(back_populates="case", cascade="all, delete-orphan",
                                                    passive_deletes=True, order_by="InputFile.id")
    fingerprint: Mapped[Optional[Fingerprint]] = relationship(back_populates="case", cascade="all, delete-orphan",
                                                                passive_deletes=True)
    outputs: Mapped[list[Output]] = relationship(back_populates="case", cascade="all, delete-orphan",
                                                   passive_deletes=True)


class InputFile(Base):
    """An image channel or the label of a case, with what its content hashed to at a given size and mtime."""

    __tablename__ = "input_files"
    __table_args__ = (UniqueConstraint("case_id", "role", "channel", name="uq_input_files_case_role_channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(8))  # "image" or "label"
    channel: Mapped[int] = mapped_column(Integer)  # channel index for images, -1 for the label
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    digest: Mapped[str] = mapped_column(String(64))

    case: Mapped[Case] = relationship(back_populates="files")


class Fingerprint(TaskColumns, Base):
    """A case's result from the fingerprint extractor's `analyze_case`, stored beside the ledger (blobs.py)."""

    __tablename__ = "fingerprints"

    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[Optional[str]] = mapped_column(String(64))
    # what the last attempt was made from (extractor key and file stats): a quarantined case is tried again only
    # when this changes, even if it never produced a result
    attempt_key: Mapped[Optional[str]] = mapped_column(String(64))
    input_digest: Mapped[Optional[str]] = mapped_column(String(64))
    result_file: Mapped[Optional[str]] = mapped_column(Text)
    result_size: Mapped[Optional[int]]
    result_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    shape_after_crop: Mapped[Optional[list[Any]]]
    spacing: Mapped[Optional[list[Any]]]

    case: Mapped[Case] = relationship(back_populates="fingerprint")


class Output(TaskColumns, Base):
    """A case's preprocessed files in one data folder (a configuration's `data_identifier`, or gt_segmentations)."""

    __tablename__ = "outputs"
    __table_args__ = (
        UniqueConstraint("case_id", "data_identifier", name="uq_outputs_case_data_identifier"),
        Index("ix_outputs_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    data_identifier: Mapped[str] = mapped_column(String(255))
    configuration: Mapped[str] = mapped_column(String(255))
    config_hash: Mapped[Optional[str]] = mapped_column(String(64))
    input_digest: Mapped[Optional[str]] = mapped_column(String(64))
    files: Mapped[Optional[list[Any]]]  # [{"name", "size", "sha256"}]

    case: Mapped[Case] = relationship(back_populates="outputs")


class Configuration(Base):
    """The configurations the last plan produced for this dataset, and the hash each one's outputs are keyed on."""

    __tablename__ = "configurations"

    data_identifier: Mapped[str] = mapped_column(String(255), primary_key=True)
    configuration: Mapped[str] = mapped_column(String(255))
    plans_identifier: Mapped[str] = mapped_column(String(255))
    config_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    """A dataset-level file nnresume wrote (fingerprint JSON, plans JSON, dataset.json) and the key it was made from."""

    __tablename__ = "artifacts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    details: Mapped[Optional[dict[str, Any]]]
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    updated_at: Mapped[float] = mapped_column(Float)


class Finding(Base):
    """What a case (or the dataset) has that nnU-Net accepts but alters or ignores (level `warning`: NaN read as 0,
    image and label not aligned, only background), or a dataset-level problem no case owns (level `error`:
    dataset.json's numTraining against the cases found). A case's findings are replaced when it is fingerprinted
    again; dataset-level ones at every run."""

    __tablename__ = "findings"
    __table_args__ = (Index("ix_findings_case_id", "case_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[Optional[int]] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[Optional[str]] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    created_at: Mapped[float] = mapped_column(Float)


class Attempt(Base):
    """One try at one task (a case's fingerprint, or a case's outputs), however it ended."""

    __tablename__ = "attempts"
    __table_args__ = (Index("ix_attempts_run_id", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    case_name: Mapped[str] = mapped_column(String(255))
    stage: Mapped[str] = mapped_column(String(16))
    targets: Mapped[list[Any]]
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))  # ok, error, died, stopped
    exit_code: Mapped[Optional[int]] = mapped_column(Integer)
    signal: Mapped[Optional[int]] = mapped_column(Integer)
    peak_rss: Mapped[Optional[int]]
    # the peak less the pages the worker shares with the forkserver: what the estimate predicts
    private_peak: Mapped[Optional[int]]
    last_rss: Mapped[Optional[int]]
    estimate_bytes: Mapped[Optional[int]]
    budget_bytes: Mapped[Optional[int]]
    message: Mapped[Optional[str]] = mapped_column(Text)


class MemorySample(Base):
    """The memory governor's readings, a few per second, thinned to about one per second for the record."""

    __tablename__ = "memory_samples"
    __table_args__ = (Index("ix_memory_samples_run_id", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    t: Mapped[float] = mapped_column(Float)
    tree_rss: Mapped[int]
    available: Mapped[int]
    budget: Mapped[int]
    running: Mapped[int] = mapped_column(Integer)
