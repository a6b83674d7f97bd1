"""A child process's own primitives, shared by task workers and prediction's device process: dying with the parent,
reading its own memory (current and peak RSS), and giving the heap's free pages back to the system.

Imports nothing from the rest of the worker side, so that every module there can use it.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Optional

PR_SET_PDEATHSIG = 1
TRIM_ABOVE = 128 << 20  # heap kept by glibc beyond the worker's size at its start before it is given back
_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc: Any = None


def die_with_parent() -> None:
    """Asks the kernel to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so a killed orchestrator
    leaves no child behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS mark for this process, so each configuration's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(base_rss: int) -> None:
    """Gives the heap's free pages back to the system between tasks (glibc keeps them otherwise), when the worker
    holds more than TRIM_ABOVE beyond its size at its start. After small cases there is little to give back: a trim
    after each of 4,000 tasks of 2,000 small cases cost 2.4 s of worker CPU, and the next task faulted its pages in
    again."""
    if rss_now() - base_rss > TRIM_ABOVE:
        release_heap()


def release_heap() -> None:
    """glibc's malloc_trim: the heap's free pages go back to the system (no effect on other C libraries)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
