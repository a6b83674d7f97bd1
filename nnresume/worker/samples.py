"""A case's foreground samples for a dataset that grew: nnU-Net's samples for fewer per case, without reading it again.

nnU-Net draws 10e7 / (number of cases) foreground intensities per case and channel
(`DatasetFingerprintExtractor.collect_foreground_intensities`): one `np.random.RandomState(1234)` per case, and for
channel c `rs.choice(foreground, m)`, which is `foreground[rs.randint(0, len(foreground), m)]`. Every channel of a
case has the same foreground (one mask), so the draws form one stream of indices, and channel c takes its positions
[c·m, (c+1)·m). Adding cases lowers m; the stream does not change. So from what was kept when the case was analysed
with n samples, its samples for any m <= n follow exactly:

- channel 0: the first m of its n samples;
- channel c >= 1: positions [c·m, (c+1)·m) of the stream, all below (c+1)·n. Kept is either the foreground itself
  (when it has at most (c+1)·n voxels: the indices are drawn again) or its values at the first (c+1)·n positions.

The worker checks, for each case, that what it keeps gives back nnU-Net's own samples for n (`reproduces`); where it
does not (a custom extractor, another NumPy), nothing is kept and the case is analysed again when the count changes.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

SEED = 1234  # collect_foreground_intensities's default, which analyze_case uses

Kept = Optional[tuple[str, np.ndarray]]  # ("pixels", foreground) or ("stream", values at the first positions)
CHUNK = 1 << 22  # indices drawn at a time while skipping to a position (the stream is the same drawn in pieces)


def positions(population: int, start: int, stop: int) -> np.ndarray:
    """The stream's indices at positions [start, stop), without holding the ones before `start`."""
    rs = np.random.RandomState(SEED)
    while start > 0:
        step = min(CHUNK, start)
        rs.randint(0, population, step)
        start -= step
        stop -= step
    return rs.randint(0, population, stop)


def keep(foreground: np.ndarray, channel: int, n: int) -> Kept:
    """What channel `channel`'s samples for any count up to `n` can be made from (None for channel 0 or no
    foreground: its own samples suffice)."""
    if channel == 0 or len(foreground) == 0:
        return None
    reach = (channel + 1) * n
    if len(foreground) <= reach:
        return ("pixels", np.array(foreground, copy=True))
    return ("stream", foreground[np.random.RandomState(SEED).randint(0, len(foreground), reach)])


def samples_for(own: Any, kept: Kept, channel: int, n: int, m: int) -> Any:
    """Channel `channel`'s samples for `m` samples per case, from its own `n` samples and what was kept."""
    if m == n or len(own) == 0:
        return own
    if m > n:
        raise ValueError(f"cannot make {m} samples from a case analysed with {n}")
    if channel == 0:
        return own[:m]
    if kept is None:
        raise ValueError(f"channel {channel}: nothing kept to make {m} samples from")
    kind, values = kept
    if kind == "stream":
        return values[channel * m:(channel + 1) * m]
    return values[positions(len(values), channel * m, (channel + 1) * m)]


def reproduces(own: list[Any], kept: list[Kept], n: int) -> bool:
    """Whether what was kept gives back the samples nnU-Net drew for `n`."""
    for c in range(1, len(own)):
        if len(own[c]) == 0:
            continue
        kind, values = kept[c] or ("", np.empty(0))
        if kind == "stream":
            again = values[c * n:(c + 1) * n]
        elif kind == "pixels":
            again = values[positions(len(values), c * n, (c + 1) * n)]
        else:
            return False
        if not np.array_equal(again, own[c]):
            return False
    return True


def for_count(result: tuple, kept: Optional[list[Kept]], n: int, m: int) -> tuple:
    """`analyze_case`'s result for `m` samples per case, from the one for `n` (the other fields do not depend on
    the count)."""
    if m == n:
        return result
    own = result[2]
    return (result[0], result[1],
            [samples_for(own[c], kept[c] if kept else None, c, n, m) for c in range(len(own))], *result[3:])
