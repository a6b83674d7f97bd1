"""Errors a user sees. Each carries a message (what happened, to what), and a hint (what to do).

This module imports nothing from the rest of the package, so every module can raise these.
"""
from __future__ import annotations

import re

# NumPy 2 writes scalars as np.str_('case_0001') or np.int64(3); a message shows the value itself
_NUMPY_SCALAR = re.compile(r"np\.(?:str_|bytes_|u?int\d*|float\d*|bool_?)\(([^()]*)\)")


def plain(text: str) -> str:
    """`text` with NumPy scalar reprs replaced by their values."""
    return _NUMPY_SCALAR.sub(r"\1", text)


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CASES_FAILED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class NnresumeError(Exception):
    """Base class. The CLI prints `message` and `hint` and exits with `exit_code`, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        message, hint = plain(message), plain(hint) if hint else hint
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def one_line(self) -> str:
        """For the ledger and logs: one problem, one line."""
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(NnresumeError):
    """Bad options or environment (exit code 2, like click's own usage errors)."""

    exit_code = 2


class DatasetError(NnresumeError):
    """The dataset as a whole cannot be used: missing folder, missing or invalid dataset.json, no cases."""


class LockedError(NnresumeError):
    """Another nnresume run holds the dataset's lock."""


class LedgerError(NnresumeError):
    """The ledger cannot be opened or upgraded."""


class CaseError(NnresumeError):
    """One case cannot be processed; the run goes on with the others.

    Raised inside workers; its message names the case, the file and the cause.
    """

    def __init__(self, case: str, message: str, path: str | None = None, hint: str | None = None) -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"case {case}{where}: {message}", hint)
        self.case = case
        self.path = path


class InputChangedError(CaseError):
    """A case's input files changed while nnresume was reading them."""


class Interrupted(NnresumeError):
    """SIGINT or SIGTERM stopped the run; the ledger is consistent and a rerun resumes."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"stopped by {signal_name}", "run the same command again to resume")
        self.signal_name = signal_name
        self.exit_code = exit_code


class DiskFullError(NnresumeError):
    """No space left on the device that holds the outputs or the ledger; a rerun resumes once space is freed."""


class WorkerDied(Exception):
    """A dataset-level step's worker ended without reporting (a signal, an abnormal exit); the runner retries it.

    Not an NnresumeError: it never reaches the user as such, only after the retries as one."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description
