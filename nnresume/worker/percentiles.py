"""`np.percentile(a, q)` for the fingerprint's 10e7 samples per channel, the same bits, about seven times sooner.

nnU-Net's aggregation takes the 0.5th, 50th and 99.5th percentiles of every channel's samples. `np.percentile`
partitions a copy of the whole array around eight ranks (the six it needs, the first and the last): 2.2 s for 10⁸
float32 values, on one core, while every other worker waits; an RGB dataset pays it three times. Its result depends on
nothing but the values found at those ranks and numpy's interpolation between them, so here:

1. numpy's own functions give the ranks and, at the end, the interpolation (`_get_indexes`, `_get_gamma`, `_lerp`
   of `numpy.lib._function_base_impl`; without them, or for any array this does not handle, `np.percentile` itself);
2. a sorted strided sample of 2¹⁸ values brackets each rank;
3. one pass over the array counts the values below each bracket and keeps those inside it (about 1 % of them);
4. partitioning what was kept gives the value at each rank exactly; a rank that fell outside its bracket (the count
   says so) means `np.percentile` after all.

The value at a rank is unique except for the sign of a floating zero (−0.0 and 0.0 compare equal, and which of them a
partition leaves at a rank depends on how it moves data): a zero at a rank of an array holding zeros of both signs
also means `np.percentile`, and so does a NaN anywhere (it makes every percentile NaN). `tests/test_percentiles.py`
compares both bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

SAMPLE = 1 << 18  # values in the sample that places the brackets
CHUNK = 1 << 21  # values compared at a time (bounds the pass's temporaries to a few MB)
MIN_SIZE = 1 << 20  # below this, np.percentile is quick enough


def percentile(a: np.ndarray, q: Any) -> Any:
    """`np.percentile(a, q)` for a 1-D real array and a 1-D array of percentiles (method 'linear'), bit for bit."""
    a = np.asarray(a)
    try:
        from numpy.lib._function_base_impl import (  # type: ignore[attr-defined]
            _get_gamma,
            _get_indexes,
            _lerp,
            _QuantileMethods,
        )
    except ImportError:  # a numpy whose private layout differs: the plain call, which is always right
        return np.percentile(a, q)
    if a.ndim != 1 or a.size < MIN_SIZE or a.dtype.kind not in "iuf" or np.ndim(q) != 1:
        return np.percentile(a, q)
    # np.percentile's own steps, up to its partition
    quantiles = np.asanyarray(np.true_divide(q, 100, out=...))
    if not (np.all(quantiles >= 0) and np.all(quantiles <= 1)):
        return np.percentile(a, q)  # its error message
    n = a.size
    method = _QuantileMethods["linear"]
    virtual = np.asanyarray(method["get_virtual_index"](n, quantiles))
    previous_indexes, next_indexes = _get_indexes(a, virtual, n)
    values = _order_statistics(a, sorted({int(i) % n for i in np.concatenate((previous_indexes, next_indexes))}))
    if values is None:
        return np.percentile(a, q)
    previous = np.array([values[int(i) % n] for i in previous_indexes], dtype=a.dtype)
    following = np.array([values[int(i) % n] for i in next_indexes], dtype=a.dtype)
    gamma = _get_gamma(virtual, previous_indexes, method).reshape(virtual.shape)
    return _lerp(previous, following, gamma)


def _order_statistics(a: np.ndarray, ranks: Sequence[int]) -> Optional[dict[int, Any]]:
    """The value at each rank of sorted `a` (ascending ranks), or None when a bracket missed or `a` holds a NaN."""
    n = a.size
    sample = np.sort(a[::max(1, n // SAMPLE)])
    m = sample.size
    # a sample quantile's rank is off by about sqrt(m) sample places; three times that, plus a floor for ties
    margin = 3 * math.isqrt(m) + 64
    spans: list[tuple[int, int, list[int]]] = []  # (first, last) sample places around neighbouring ranks
    for r in ranks:
        centre = round(r / (n - 1) * (m - 1))
        lo, hi = centre - margin, centre + margin
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], hi, spans[-1][2] + [r])
        else:
            spans.append((lo, hi, [r]))
    # None: unbounded on that side
    bounds = [(sample[lo] if lo > 0 else None, sample[hi] if hi < m - 1 else None) for lo, hi, _ in spans]
    below = [0] * len(spans)
    kept: list[list[np.ndarray]] = [[] for _ in spans]
    at_least = np.empty(min(CHUNK, n), bool)
    at_most = np.empty(min(CHUNK, n), bool)
    for start in range(0, n, CHUNK):
        chunk = a[start:start + CHUNK]
        k = chunk.size
        if a.dtype.kind == "f" and np.isnan(chunk.max()):
            return None
        ge, le = at_least[:k], at_most[:k]
        for j, (low, high) in enumerate(bounds):
            if low is None and high is None:
                kept[j].append(chunk)
                continue
            if low is not None:
                np.greater_equal(chunk, low, out=ge)
                below[j] += k - int(np.count_nonzero(ge))
            if high is None:
                kept[j].append(chunk[ge])
                continue
            np.less_equal(chunk, high, out=le)
            if low is not None:
                np.logical_and(ge, le, out=le)
            kept[j].append(chunk[le])
    values: dict[int, Any] = {}
    for j, (_, _, span_ranks) in enumerate(spans):
        inside = np.concatenate(kept[j])
        places = [r - below[j] for r in span_ranks]
        if places[0] < 0 or places[-1] >= inside.size:
            return None
        inside.partition(places)
        values.update((r, inside[p]) for r, p in zip(span_ranks, places))
        if a.dtype.kind == "f" and any(values[r] == 0 for r in span_ranks):
            # every zero of `a` is inside this span (its bounds enclose a zero); with both signs among them, which
            # one sits at the rank is up to how a partition moves data
            signs = np.signbit(inside[inside == 0])
            if signs.any() and not signs.all():
                return None
    return values
