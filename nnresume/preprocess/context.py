"""What every stage of one dataset's run shares: settings, layout, the run session, the pool and the memory budget."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import PreprocessSettings
from ..dataset import DatasetLayout
from ..execution.memory import Estimator
from ..execution.pools.base import Pool
from ..execution.runner import Runner, StopFlag
from ..io import atomic, crashpoints
from ..ledger.repository import Ledger
from ..progress import StageProgress
from ..session import Session

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    settings: PreprocessSettings
    layout: DatasetLayout
    session: Session
    stop: StopFlag
    budget: int
    workers: int
    nnunetv2_version: str
    pool: Pool  # given by the caller, who starts and stops it (it may serve several datasets)
    estimator: Estimator = field(default_factory=Estimator)

    @property
    def ledger(self) -> Ledger:
        return self.session.ledger

    @property
    def run_id(self) -> int:
        return self.session.run_id

    @property
    def staging(self) -> Path:
        return self.session.staging

    def runner(self, max_workers: int, progress: Optional[StageProgress]) -> Runner:
        return Runner(self.pool, self.budget, max_workers, self.estimator, self.run_id,
                      self.ledger.add_attempt, lambda s: self.ledger.add_memory_samples(self.run_id, s),
                      self.stop, self.settings.grace_seconds, progress=progress)

    def _peak(self, runner: Runner) -> None:
        self.session.peak_tree = max(self.session.peak_tree, runner.peak_tree)

    def run_stage(self, desc: str, scheduler: Any, handler: Any, skipped: int) -> Any:
        """Runs a stage's queued tasks with a progress bar; returns the runner's StageStats."""
        progress = self.progress(desc, len(scheduler), skipped)
        runner = self.runner(scheduler.max_workers, progress)
        try:
            return runner.run(scheduler, handler)
        finally:
            progress.close()
            self._peak(runner)

    def run_one(self, task: Any) -> Any:
        """A dataset-level task in a worker (nnunetv2 is never imported by the orchestrator)."""
        runner = self.runner(1, None)
        try:
            return runner.run_one(task)
        finally:
            self._peak(runner)

    def progress(self, desc: str, total: int, skipped: int) -> StageProgress:
        return StageProgress(desc, total, skipped, self.settings.progress_bar)


def place_files(files: list[Any], folder: Path, case: Optional[str] = None) -> None:
    """Moves staged files into `folder` in the given order, then fsyncs the folder once.

    The caller commits the ledger after this returns; until then the files are not vouched for.
    """
    crashpoints.set_case(case)
    created = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if created:
        atomic.fsync_dir(folder.parent)
    for i, f in enumerate(files):
        os.replace(f.staged_path, folder / f.name)
        if i == 0 and len(files) > 1:
            crashpoints.reached("between_renames")
    atomic.fsync_dir(folder)
    crashpoints.reached("renamed")


def place_artifact(staged: Any, final: Path, crash_point: str) -> None:
    """Moves a staged dataset-level file (fingerprint JSON, plans) onto its final name, durably."""
    crashpoints.reached(crash_point)
    os.replace(staged.staged_path, final)
    atomic.fsync_dir(final.parent)


def stat_matches(path: Path, size: Optional[int]) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
