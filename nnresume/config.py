"""Frozen settings for a run, and the parsers that build them from command-line strings.

Nothing here touches the file system beyond reading environment variables.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Union

from .errors import UsageError

DEFAULT_CONFIGURATIONS: tuple[str, ...] = ("2d", "3d_fullres", "3d_lowres")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryBudget:
    """Either an absolute number of bytes or a fraction of the memory available when the run starts."""

    bytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        if self.fraction is not None:
            return f"{self.fraction:g} of available memory"
        return "available memory minus a reserve"


def parse_memory(text: str) -> MemoryBudget:
    """Parses `--max-ram`: `28G`, `512M`, `1.5T`, `123456789` (bytes), or a fraction `0.8` (of available memory).

    Units are binary (G = 2**30), as SLURM's `--mem` uses them. A bare number in (0, 1] is a fraction.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read memory size {text!r}",
                         "use a number with an optional K/M/G/T suffix (28G, 512M) or a fraction such as 0.8")
    number, unit = float(m.group(1)), m.group(2).upper()
    if not unit and 0 < number <= 1 and ("." in m.group(1) or number < 1):
        return MemoryBudget(fraction=number)
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"memory size {text!r} must be positive")
    return MemoryBudget(bytes=value)


def format_bytes(n: Union[int, float, None]) -> str:
    """Binary units, named as such: --max-ram 2400M is 2.3 GiB."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_spacing(values: tuple[str, ...] | None) -> tuple[float, ...] | None:
    if not values:
        return None
    try:
        spacing = tuple(float(v) for v in values)
    except ValueError:
        raise UsageError(f"-overwrite_target_spacing takes numbers, got {' '.join(values)}") from None
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise UsageError("-overwrite_target_spacing takes three positive numbers (z y x)")
    return spacing


@dataclass(frozen=True)
class Paths:
    raw: str
    preprocessed: str

    @staticmethod
    def from_environment() -> "Paths":
        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
        if missing:
            raise UsageError(f"environment variable {' and '.join(missing)} not set",
                             "export nnUNet_raw and nnUNet_preprocessed as for nnU-Net")
        return Paths(raw=os.path.abspath(os.environ["nnUNet_raw"]),
                     preprocessed=os.path.abspath(os.environ["nnUNet_preprocessed"]))


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything `nnresume preprocess` needs, as the user gave it."""

    datasets: tuple[str, ...]
    configurations: tuple[str, ...] = DEFAULT_CONFIGURATIONS
    planner: str = "ExperimentPlanner"
    fingerprint_extractor: str = "DatasetFingerprintExtractor"
    gpu_memory_target: float | None = None
    overwrite_plans_name: str | None = None
    overwrite_target_spacing: tuple[float, ...] | None = None
    preprocessor_name: str = "DefaultPreprocessor"
    verify_dataset_integrity: bool = False
    num_workers: int | None = None
    num_workers_fingerprint: int | None = None
    max_ram: MemoryBudget = field(default_factory=MemoryBudget)
    progress_bar: bool = True
    verify_outputs: bool = False
    dry_run: bool = False
    retry_quarantined: bool = False
    replan: bool = False
    grace_seconds: float = 20.0

    def planner_arguments(self) -> dict:
        """The arguments that decide what the planner writes; part of the plans' key in the ledger."""
        return {
            "planner": self.planner,
            "gpu_memory_target": self.gpu_memory_target,
            "overwrite_plans_name": self.overwrite_plans_name,
            "overwrite_target_spacing": list(self.overwrite_target_spacing) if self.overwrite_target_spacing else None,
            "preprocessor_name": self.preprocessor_name,
        }

