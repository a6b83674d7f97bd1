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
# every configuration nnU-Net's own planners (ExperimentPlanner and the ResEnc presets) can make
STANDARD_CONFIGURATIONS: tuple[str, ...] = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)

# What nnresume itself holds before a case runs: the orchestrator (~0.1 GiB), the forkserver with nnunetv2 imported
# (~0.4 GiB RSS) and one freshly forked worker. A budget below this cannot run a single case.
MIN_BUDGET = 768 * 1024**2


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
    """Parses `--max-ram`: `28G`, `512M`, `1.5T`, `123456789B` (bytes), or a fraction `0.8` (of available memory).

    Units are binary (G = 2**30), as SLURM's `--mem` uses them. A bare number is a fraction and must lie in (0, 1):
    `1.5` or `2400` without a unit could mean bytes, megabytes (SLURM's default) or gigabytes, so it is refused.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read memory size {text!r}",
                         "use a number with a K/M/G/T suffix (28G, 512M) or a fraction such as 0.8")
    number, unit, b = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not unit and not b:
        if 0 < number < 1:
            return MemoryBudget(fraction=number)
        raise UsageError(f"--max-ram {text.strip()} is ambiguous: a number without a unit is a fraction of available "
                         "memory and must be between 0 and 1",
                         f"for a size add its unit ({m.group(1)}G, {m.group(1)}M), or give a fraction such as 0.8")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"memory size {text!r} must be positive")
    return MemoryBudget(bytes=value)


def check_budget(budget: int, given: MemoryBudget) -> None:
    """A budget below what nnresume itself needs would stop every case: refuse it before any work."""
    if budget < MIN_BUDGET:
        what = f"--max-ram {given}" if given.bytes is not None or given.fraction is not None else "the memory available"
        raise UsageError(f"{what} gives a budget of {format_bytes(budget)}, less than the {format_bytes(MIN_BUDGET)} "
                         "nnresume needs for itself and one worker",
                         "give at least 1G (28G on a node with 32 GB), or leave --max-ram out to use what is available")


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


def close_matches(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    """`did you mean ...` text for a hint, or the full list when nothing is close."""
    import difflib

    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(near)}?" if near else f"choose from {', '.join(sorted(candidates))}"


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
    def from_environment() -> Paths:
        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
        if missing:
            raise UsageError(f"environment variable {' and '.join(missing)} not set",
                             "export nnUNet_raw and nnUNet_preprocessed as for nnU-Net")
        return Paths(raw=os.path.abspath(os.environ["nnUNet_raw"]),
                     preprocessed=os.path.abspath(os.environ["nnUNet_preprocessed"]))

    @staticmethod
    def for_reading() -> Paths:
        """For commands that read only the ledger and outputs (status, verify, report): nnUNet_raw is optional."""
        if not os.environ.get("nnUNet_preprocessed"):
            raise UsageError("environment variable nnUNet_preprocessed not set",
                             "export nnUNet_preprocessed as for nnU-Net")
        raw = os.environ.get("nnUNet_raw")
        return Paths(raw=os.path.abspath(raw) if raw else "",
                     preprocessed=os.path.abspath(os.environ["nnUNet_preprocessed"]))


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything `nnresume preprocess` needs, as the user gave it."""

    datasets: tuple[str, ...]
    configurations: tuple[str, ...] = DEFAULT_CONFIGURATIONS
    explicit_configurations: bool = False  # given with -c: one the plans lack is an error, not skipped
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
    strict: bool = False
    allow_oversize: bool = False
    # -plans_name: preprocess against these existing plans (nnUNetv2_preprocess), never planning or writing them
    plans_name: str | None = None
    # how far to go: "fingerprint" (nnUNetv2_extract_fingerprint), "plan" (nnUNetv2_plan_experiment; --no_pp) or
    # "preprocess" (all three steps, as nnUNetv2_plan_and_preprocess)
    steps: str = "preprocess"

    def planner_arguments(self) -> dict:
        """The arguments that decide what the planner writes; part of the plans' key in the ledger."""
        return {
            "planner": self.planner,
            "gpu_memory_target": self.gpu_memory_target,
            "overwrite_plans_name": self.overwrite_plans_name,
            "overwrite_target_spacing": list(self.overwrite_target_spacing) if self.overwrite_target_spacing else None,
            "preprocessor_name": self.preprocessor_name,
        }

