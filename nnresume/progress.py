"""Logging set-up and progress bars. Only the CLI calls `setup_logging`; library code only logs."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .config import format_bytes

CONSOLE_FORMAT = "%(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class ConsoleHandler(logging.Handler):
    """Writes to stderr through tqdm, so log lines appear above progress bars instead of through them.

    (tqdm's own `logging_redirect_tqdm` replaces the handler and loses its level.)
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        if getattr(h, "_nnresume_console", False):
            root.removeHandler(h)
    console = ConsoleHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console._nnresume_console = True  # type: ignore[attr-defined]
    root.addHandler(console)
    for noisy in ("alembic", "sqlalchemy", "matplotlib", "PIL", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_run_log(path: Path) -> logging.Handler:
    """A DEBUG log file for one run, beside the ledger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def remove_handler(handler: Optional[logging.Handler]) -> None:
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


class StageProgress:
    """A tqdm bar for one stage: cases done, failed and skipped, an ETA from this run's own rate, and memory."""

    def __init__(self, desc: str, total: int, skipped: int, enabled: bool) -> None:
        self.enabled = enabled
        self.done = self.failed = 0
        self.skipped = skipped
        self.total = total
        self._mem = ""
        self._last = 0.0
        self._used_budget: Optional[tuple[int, int]] = None
        self.bar = tqdm(desc=desc, total=total, initial=0, disable=not enabled, unit="case", dynamic_ncols=True,
                        leave=True, smoothing=0.05)
        self._postfix()

    def _postfix(self) -> None:
        if self.enabled:
            parts = f"done={self.done} failed={self.failed} skipped={self.skipped}"
            self.bar.set_postfix_str(parts + (f" {self._mem}" if self._mem else ""), refresh=False)

    def case_done(self) -> None:
        self.done += 1
        self._postfix()
        self.bar.update(1)

    def case_failed(self) -> None:
        self.failed += 1
        self._postfix()
        self.bar.update(1)

    def memory(self, used: int, budget: int, running: int, force: bool = False) -> None:
        now = time.monotonic()
        self._used_budget = (used, budget)
        if now - self._last < 0.5 and not force:
            return
        self._last = now
        self._mem = f"RAM {format_bytes(used)}/{format_bytes(budget)} running={running}"
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        """The bar's last line shows the stage ended: nothing running (an update may have been skipped as too soon
        after the previous one)."""
        if self._used_budget is not None:
            self.memory(*self._used_budget, running=0, force=True)
        self.bar.close()
