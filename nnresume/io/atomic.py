"""Durable, atomic file placement.

A file becomes visible under its final name only complete: it is written in a staging folder on the same file system,
fsynced, moved with `os.replace` (atomic on POSIX), and the destination directory is fsynced so the rename itself
survives a power cut. Staging folders never live inside a configuration folder, because nnU-Net's training lists
`*.b2nd` there and would take a half-written file for a case.

This module knows nothing of cases or the ledger.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import crashpoints

HASH_NAME = "sha256"
_BUFSIZE = 1 << 20


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (hashlib.file_digest would need Python 3.11)."""
    return size_and_digest(path)[1]


def syncfs(path: str | os.PathLike) -> bool:
    """Flushes everything written to the file system holding `path` (Linux `syncfs`): one call makes a whole group
    of files durable where an fsync each would cost a journal commit each. False where it is not available."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):
        return False
    try:
        return getattr(_libc, "syncfs", None) is not None and _libc.syncfs(fd) == 0
    finally:
        os.close(fd)


_libc: Any = None


def size_and_digest(path: str | os.PathLike, sync: bool = False) -> tuple[int, str]:
    """Size and SHA-256 of a file just written, with one open; `sync` fsyncs it on the way."""
    h = hashlib.new(HASH_NAME)
    size = 0
    with open(path, "rb", buffering=0) as f:
        if sync:
            os.fsync(f.fileno())
        buf = bytearray(_BUFSIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def replace_into(src: str | os.PathLike, dst: str | os.PathLike, sync_dir: bool = True) -> None:
    """Moves `src` onto `dst` atomically; fsyncs the destination directory unless the caller batches that."""
    os.replace(src, dst)
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(dst)))


@contextlib.contextmanager
def staged_path(staging_dir: str | os.PathLike, final: str | os.PathLike, crash_point: str | None = None
                ) -> Iterator[str]:
    """Yields a path in `staging_dir` to write; on success fsyncs it and moves it onto `final`.

    On an exception the staged file is removed and `final` is left as it was.
    """
    os.makedirs(staging_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=Path(final).name + ".", dir=staging_dir)
    os.close(fd)
    try:
        yield tmp
        fsync_file(tmp)
        if crash_point:
            crashpoints.reached(crash_point)
        replace_into(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise



def copy_file(src: str | os.PathLike, final: str | os.PathLike, staging_dir: str | os.PathLike) -> None:
    """Copies content and modification time (as `shutil.copy2`), atomically."""
    with staged_path(staging_dir, final) as tmp:
        shutil.copy2(src, tmp)


