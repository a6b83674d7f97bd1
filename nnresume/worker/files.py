"""A case's files on the worker side: its input files stat'ed and hashed (a missing or unreadable one fails the case),
and its output files staged, with the size and checksum the orchestrator records.

Imports nothing from the rest of the worker side.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from ..errors import CaseError
from ..io import atomic, crashpoints
from ..tasks import InputFileInfo, StagedFile


def input_digest(files: list[InputFileInfo]) -> str:
    """A case's input digest: its files' digests, in role/channel order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.role != "image", f.channel)):
        h.update(f"{f.role}:{f.channel}:{f.digest}\n".encode())
    return h.hexdigest()


def stat_input(case: str, path: str) -> os.stat_result:
    """The input file's stat; a missing or unreadable file fails the case, naming it."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CaseError(case, "file is missing", path) from None
    except OSError as e:
        raise CaseError(case, f"cannot read file: {e.strerror}", path) from None


def hash_input(case: str, path: str) -> str:
    """The input file's SHA-256; an unreadable file fails the case, naming it."""
    try:
        return atomic.file_digest(path)
    except OSError as e:
        raise CaseError(case, f"cannot read file: {e.strerror}", path) from None


def file_stats(files: Any) -> list[tuple[str, int, int]]:
    """What identifies a case's input files for the read cache: path, size and modification time of each."""
    return sorted((f.path, f.size, f.mtime_ns) for f in files)


def stage_files(staging: str, case: str, names: list[str], write: Callable[[str], None]) -> tuple[StagedFile, ...]:
    """Runs `write(prefix)` with the prefix `<staging>.<case>` and returns name, size and checksum of each file it
    wrote, `<staging>.<name>`.

    `staging` names one attempt (of one target) in the run's staging folder, which the run made and emptied when it
    started: no folder is made per task (under load a mkdir and the orchestrator's rmdir cost ~0.5 ms each, waiting
    on the file system's journal). Nothing is fsynced here: the orchestrator renames the files into their folder and
    makes them durable, for a group of tasks at once, before the ledger commit that vouches for them
    (preprocess/context.py, GroupCommit).
    """
    write(f"{staging}.{case}")
    staged = []
    for name in names:
        path = f"{staging}.{name}"
        size, digest = atomic.size_and_digest(path)
        staged.append(StagedFile(name, path, size, digest))
    crashpoints.reached("staged")
    return tuple(staged)


def staged_file(path: str) -> StagedFile:
    """A dataset step's file, written into staging at `path`: fsynced here, with its size and checksum."""
    size, digest = atomic.size_and_digest(path, sync=True)
    staged = StagedFile(os.path.basename(path), path, size, digest)
    crashpoints.reached("staged")
    return staged
