"""One `nnresume preprocess` per dataset at a time.

The lock is an `flock` on a file in the dataset's working folder. The kernel releases it when the holder exits,
however it exits (SIGKILL included), so a lock left by a killed run is simply free: the next run takes it over and
finds the dead run still marked `running` in the ledger, which it then records as interrupted. The holder writes its
PID, host and start time into the file so that a refused second run can say who holds it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import psutil

from ..errors import LockedError


def process_started_at(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def holder_alive(host: str, pid: int, started_at: Optional[float]) -> Optional[bool]:
    """True/False on this host; None when the holder is on another host (we cannot tell from here)."""
    if host != socket.gethostname():
        return None
    actual = process_started_at(pid)
    if actual is None:
        return False
    return started_at is None or abs(actual - started_at) < 1.0


class DatasetLock:
    def __init__(self, path: Path, dataset: str) -> None:
        self.path, self.dataset = Path(path), dataset
        self._fd: Optional[int] = None

    def read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                h = self.read_holder()
                since = datetime.fromtimestamp(h["started_at"]).isoformat(sep=" ", timespec="seconds") \
                    if h.get("started_at") else "an unknown time"
                raise LockedError(
                    f"dataset {self.dataset} is being preprocessed by PID {h.get('pid', '?')} on host "
                    f"{h.get('host', '?')} since {since}",
                    "wait for it to finish, or watch it with `nnresume status`") from None
            raise LockedError(f"cannot lock {self.path}: {e.strerror}",
                              "the file system must support flock (local disks and NFSv4 do)") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
              "pid_started_at": process_started_at(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def is_held_elsewhere(self) -> bool:
        """True if another process holds the lock now (checked without keeping it)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DatasetLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
