"""A case read once for both stages of a run: what the reader returned in the fingerprint stage, kept for preprocessing.

nnU-Net reads every case twice, once to fingerprint it and once to preprocess it, and decoding the files (PNG, gzip
of a NIfTI) is a large part of a small case's cost. When the orchestrator asks for it (small cases, a bounded total,
see preprocess/fingerprint.py), the fingerprint stage keeps the reader's output here: the images and their
properties as `read_images` returned them and the segmentation as `read_seg` returned it, copied before nnU-Net's
cropping alters the segmentation in place. The preprocessing stage of the same run uses it instead of reading the files
again, after the same checks that the files have not changed since their fingerprint was taken.

It is a cache, not a result: it lives in the run's staging folder (removed when a run starts and ends), is written
without fsync (a run that outlives a power loss cannot exist: the next run starts with an empty folder), and anything
unexpected about it (missing, another reader, unreadable) means the files are read as usual.
"""
from __future__ import annotations

import logging
import os
import pickle
from copy import deepcopy
from typing import Any, Optional

import numpy as np

log = logging.getLogger("nnresume")

FORMAT = 1


class Capture:
    """Receives what the validating reader returned (validate.validating_reader) and writes it to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.images: Optional[tuple[np.ndarray, dict[str, Any]]] = None
        self.seg: Optional[np.ndarray] = None

    def took_images(self, data: np.ndarray, properties: dict[str, Any]) -> None:
        if self.images is None:
            self.images = (np.array(data, copy=True), deepcopy(properties))

    def took_seg(self, seg: np.ndarray) -> None:
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
