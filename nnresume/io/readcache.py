"""A case read once for both stages of a run: what the reader returned in the fingerprint stage, kept for preprocessing.

nnU-Net reads every case twice, once to fingerprint it and once to preprocess it, and decoding the files (PNG, gzip
of a NIfTI) is a large part of a small case's cost. When the orchestrator asks for it (small cases, a bounded total,
see preprocess/fingerprint.py), the fingerprint stage keeps the reader's output: the images and their properties as
`read_images` returned them and the segmentation as `read_seg` returned it, copied before nnU-Net's cropping alters
the segmentation in place. The preprocessing stage of the same run uses it instead of reading the files again, after
the same checks that the files have not changed since their fingerprint was taken.

Both sides are here. In a worker, `Capture` receives what the validating reader returned (worker/validate.py) and
writes it; `load` gives it to the preprocessing task. In the orchestrator, `ReadCache` decides which cases are kept,
where, and the memory they hold.

The copies are caches, not results: nothing needs them on disk. In the run's staging folder, the group commit's
`syncfs` wrote every one to disk anyway (on 2,000 one-channel PNG cases 200 KB each beside a 50 KB result, which made
the cache cost more than the second read it saved). So they go to a RAM file system (`/dev/shm`) where there is one
with room, and the staging folder (removed when a run starts and ends) only where there is none. They are written
without fsync (a run that outlives a power loss cannot exist: the next run starts with an empty folder), and anything
unexpected about one (missing, another reader, unreadable) means the files are read as usual.

In RAM they are memory the run holds outside its processes: `held` bytes (each case's allotment, from it being handed
out until its preprocessing has taken it, or until the outputs are planned and need no preprocessing of it) count
with the process tree against the budget (execution/runner.py), and the total stays within min(4 GiB, budget / 8,
a quarter of the RAM file system's free space). The folder is the run process's
(`nnresume-reads-<pid>-<start time>`): removed when the run ends, and a folder whose process is gone (a run killed
with SIGKILL) is removed by the next preprocessing run on this machine.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import psutil

if TYPE_CHECKING:  # numpy is imported where a worker uses it: the orchestrator imports this module without it
    import numpy as np

log = logging.getLogger(__name__)

# bytes per fingerprint unit (a value of an image file, float32 as nnU-Net's readers return it, and at most as much
# again for the segmentation, which they return as float32 too), the largest case kept (beyond it reading is small
# beside the case's other work) and the most kept in a run
BYTES_PER_UNIT = 8
PER_CASE = 16 << 20
TOTAL = 4 << 30
RAM_FOLDER = Path("/dev/shm")
PREFIX = "nnresume-reads-"

FORMAT = 1  # the layout of a kept file; `load` ignores any other


# ---- the worker's side -----------------------------------------------------------------------------------------------

class Capture:
    """Receives what the validating reader returned (worker/validate.py: `validating_reader`); writes it to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.images: Optional[tuple[np.ndarray, dict[str, Any]]] = None
        self.seg: Optional[np.ndarray] = None

    def took_images(self, data: np.ndarray, properties: dict[str, Any]) -> None:
        import numpy as np

        if self.images is None:
            self.images = (np.array(data, copy=True), deepcopy(properties))

    def took_seg(self, seg: np.ndarray) -> None:
        import numpy as np

        if self.seg is None:
            self.seg = np.array(seg, copy=True)

    def save(self, reader: str, files: list[tuple[str, int, int]]) -> None:
        """Writes the capture (atomically: a killed worker leaves no partial file under the final name)."""
        if self.images is None or self.seg is None:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "wb") as f:
                pickle.dump((FORMAT, reader, files, self.images[0], self.images[1], self.seg), f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.path)
        except Exception as e:  # a cache that cannot be written only costs a second read
            log.debug("read cache %s not written: %s", self.path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load(path: str, reader: str, files: list[tuple[str, int, int]]
         ) -> Optional[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """(data, seg, properties) as `read_case` returns them, if `path` holds a read of these files (path, size,
    mtime) by this reader; else None. The file is removed: it serves one preprocessing task."""
    try:
        with open(path, "rb") as f:
            fmt, cached_reader, cached_files, data, properties, seg = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:
        log.debug("read cache %s not used: %s", path, e)
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if fmt != FORMAT or cached_reader != reader or [tuple(f) for f in cached_files] != [tuple(f) for f in files]:
        return None
    return data, seg, properties


# ---- the orchestrator's side -----------------------------------------------------------------------------------------

def _process_tag(pid: int) -> Optional[str]:
    try:
        return f"{pid}-{int(psutil.Process(pid).create_time())}"
    except (psutil.Error, OSError):
        return None


def remove_abandoned(root: Path = RAM_FOLDER) -> None:
    """Removes read-cache folders in `root` whose run process no longer exists."""
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for e in entries:
        tag = e.name[len(PREFIX):]
        pid = tag.split("-", 1)[0]
        if pid.isdigit() and _process_tag(int(pid)) == tag:
            continue  # a run in progress
        if e.stat(follow_symlinks=False).st_uid == os.getuid():
            log.debug("removing %s, left by a run that was killed", e.path)
            shutil.rmtree(e.path, ignore_errors=True)


class ReadCache:
    """Which cases the fingerprint stage keeps as read, the folder they go to, and the bytes they hold in RAM."""

    def __init__(self, staging: Path, budget: int, enabled: bool, ram_root: Path = RAM_FOLDER) -> None:
        self.folder = staging / "reads"
        self.in_ram = False
        self.left = 0
        self.held = 0
        self._allotted: dict[str, int] = {}
        if not enabled:  # the workers are on other machines
            return
        ram_free = _free(ram_root) if os.access(ram_root, os.W_OK) else 0
        tag = _process_tag(os.getpid())
        if tag is not None and min(TOTAL, budget // 8) <= ram_free // 4:
            remove_abandoned(ram_root)
            self.folder, self.in_ram = ram_root / f"{PREFIX}{tag}", True
            self.left = min(TOTAL, budget // 8)
        else:
            # on disk the files are in the page cache, which a memory cgroup counts
            self.left = min(TOTAL, budget // 8, _free(staging) // 4)

    def path(self, case: str) -> str:
        return str(self.folder / f"{case}.pkl")

    def allot(self, case: str, units: int) -> str:
        """The path where the fingerprint stage keeps `case` as read, or "" if it is not to be kept."""
        if case not in self._allotted:
            size = BYTES_PER_UNIT * units
            if not 0 < size <= min(PER_CASE, self.left):
                return ""
            self.left -= size
            self._allotted[case] = size
            if self.in_ram:
                self.held += size
        return self.path(case)

    def taken(self, case: str) -> None:
        """The case's preprocessing has ended: it read and removed its copy, or no longer needs it."""
        size = self._allotted.pop(case, 0)
        if self.in_ram:
            self.held -= size

    def keep_only(self, cases: set[str]) -> None:
        """Removes the copies of every case not in `cases` (whose outputs need no preprocessing)."""
        for case in [c for c in self._allotted if c not in cases]:
            try:
                os.unlink(self.path(case))
            except OSError:
                pass
            self.taken(case)

    def remove(self) -> None:
        if self.in_ram:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.held = 0


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0
