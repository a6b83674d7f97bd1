"""The aggregation's percentiles against `np.percentile`, bit for bit, on the kinds of samples nnU-Net collects."""
from __future__ import annotations

import numpy as np
import pytest

from nnresume.worker import percentiles

Q = np.array((0.5, 50.0, 99.5))  # nnU-Net's


def _samples(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == 0:
        return rng.normal(40, 300, n).astype(np.float32)  # CT-like floats
    if kind == 1:
        return rng.integers(-1024, 3000, n).astype(np.int16)  # CT stored as integers: many ties
    if kind == 2:
        return rng.integers(0, 256, n).astype(np.uint8)  # photographs
    if kind == 3:
        return np.sort(rng.normal(0, 1, n))  # sorted: a strided sample sees it exactly
    if kind == 4:
        return np.full(n, 7.5, np.float32)  # constant
    if kind == 5:
        return rng.choice(np.array([0.0, -0.0, 1.0, -1.0], np.float32), n)  # signed zeros at the ranks
    if kind == 6:
        return (rng.integers(0, 3, n) * 1e30).astype(np.float32)  # three values, huge
    if kind == 8:
        a = rng.integers(0, 256, n).astype(np.float32)  # a photograph read as float: zeros (of one sign) at a rank
        a[: n // 3] = 0
        return a
    if kind == 7:
        a = np.concatenate([rng.normal(0, 1, n // 2), np.full(n - n // 2, np.inf)]).astype(np.float32)
        rng.shuffle(a)
        return a  # half infinite: inf - inf in the interpolation, as in numpy's
    return rng.exponential(1, n)[::-1].copy()  # skewed, float64


def _same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.tobytes() == theirs.tobytes()


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_the_same_bits_as_numpy_on_many_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    # small constants so that thousands of arrays take the fast path in a second
    monkeypatch.setattr(percentiles, "MIN_SIZE", 1000)
    monkeypatch.setattr(percentiles, "SAMPLE", 1 << 10)
    monkeypatch.setattr(percentiles, "CHUNK", 1 << 12)
    numpy_percentile = np.percentile
    plain_calls = []
    monkeypatch.setattr(np, "percentile", lambda *a, **k: plain_calls.append(1) or numpy_percentile(*a, **k))
    rng = np.random.default_rng(7)
    qs = [Q, np.array((0.0, 100.0)), np.array((25.0, 75.0, 33.3, 99.999))]
    mismatches, fast = [], 0
    for i in range(1000):
        a = _samples(i % 10, int(rng.integers(1000, 40000)), rng)
        if i % 50 == 0 and a.dtype.kind == "f":
            a[rng.integers(a.size)] = np.nan  # every percentile becomes NaN
        before = len(plain_calls)
        ours = percentiles.percentile(a, qs[i % 3])
        fast += len(plain_calls) == before
        theirs = numpy_percentile(a, qs[i % 3])
        if not (_same(ours, theirs) or (np.isnan(ours).all() and np.isnan(theirs).all())):
            mismatches.append((i, ours, theirs))
    assert mismatches == []
    # the fast path is what was compared, not only the fallback (zeros at a rank and NaN take the plain call)
    assert fast > 700


def test_full_size_with_the_real_constants() -> None:
    rng = np.random.default_rng(3)
    for a in (rng.normal(100, 300, 4_000_000).astype(np.float32), rng.integers(-1024, 2000, 3_000_001, np.int16)):
        assert _same(percentiles.percentile(a, Q), np.percentile(a, Q))


def test_small_arrays_and_other_shapes_are_numpys_call() -> None:
    a = np.arange(10, dtype=np.float32)
    assert _same(percentiles.percentile(a, Q), np.percentile(a, Q))
    with pytest.raises(ValueError):
        percentiles.percentile(np.zeros(percentiles.MIN_SIZE, np.float32), np.array((50.0, 101.0)))
