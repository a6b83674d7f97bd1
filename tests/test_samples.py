"""A case's foreground samples for a dataset that grew (worker/samples.py) against nnU-Net's own
`collect_foreground_intensities` drawing them anew, for both ways a channel's samples are kept."""
from __future__ import annotations

import numpy as np
import pytest

from nnresume.worker import samples


@pytest.mark.parametrize("n", [40, 4000], ids=["stream-kept", "foreground-kept"])
def test_fewer_samples_per_case_are_nnunets_own(n: int) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    collect = DatasetFingerprintExtractor.collect_foreground_intensities
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 6, 20, 20)).astype(np.float32)
    seg = np.zeros((1, 6, 20, 20), dtype=np.int16)
    seg[0, 1:5, 3:15, 2:17] = 1  # 720 foreground voxels: fewer than (c + 1) * n for n=4000, more for n=40
    own, _ = collect(seg, images, num_samples=n)
    mask = seg[0] > 0
    kept = [samples.keep(images[c][mask], c, n) for c in range(3)]
    assert kept[0] is None and {k[0] for k in kept[1:] if k} == {"stream" if n == 40 else "pixels"}
    assert samples.reproduces(own, kept, n)
    result = ((6, 20, 20), [1.0, 1.0, 1.0], own, [{}] * 3, 1.0)
    for m in (n, n - 1, n // 3, 1):
        expected, _ = collect(seg, images, num_samples=m)
        derived = samples.for_count(result, kept, n, m)[2]
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(derived, expected)), m
    with pytest.raises(ValueError):
        samples.for_count(result, kept, n, n + 1)


def test_what_does_not_reproduce_is_not_kept() -> None:
    own = [np.arange(5.0), np.arange(5.0)]
    assert not samples.reproduces(own, [None, ("stream", np.arange(10.0))], 5)  # not nnU-Net's draw
    assert not samples.reproduces(own, [None, None], 5)


def test_positions_are_the_stream_drawn_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "CHUNK", 7)
    whole = np.random.RandomState(samples.SEED).randint(0, 100, 500)
    assert np.array_equal(samples.positions(100, 123, 321), whole[123:321])
