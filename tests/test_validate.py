"""Input checks on real files: truncated and corrupt .nii.gz, channel files, declared labels, blobs round-trip."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnresume.errors import CaseError
from nnresume.io import blobs
from nnresume.worker import validate


def _nifti(path: Path, shape: tuple[int, ...] = (20, 30, 40), dtype: type = np.int16) -> np.ndarray:
    arr = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=path.name.endswith(".gz"))
    return arr


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_nifti_size_matches_the_gzip_trailer(tmp_path: Path, dtype: type) -> None:
    p = tmp_path / "x.nii.gz"
    _nifti(p, dtype=dtype)
    head = gzip.decompress(p.read_bytes())
    assert validate._nifti_data_size(head[:540]) == len(head)
    validate.check_compressed("c", str(p))
    validate.check_compressed("c", str(p), full=True)


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    p = tmp_path / "x.nii.gz"
    _nifti(p, shape=(40, 64, 64))
    data = p.read_bytes()
    for n in (len(data) - 1, len(data) // 2, 100):
        cut = tmp_path / f"cut{n}.nii.gz"
        cut.write_bytes(data[:n])
        with pytest.raises(CaseError, match="truncated|corrupt") as e:
            validate.check_compressed("case_a", str(cut))
        assert "case case_a" in str(e.value) and str(cut) in str(e.value)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x55
    bad = tmp_path / "flip.nii.gz"
    bad.write_bytes(bytes(flipped))
    validate.check_compressed("c", str(bad))  # the cheap check cannot see a flip in the middle...
    with pytest.raises(CaseError, match="corrupt compressed data"):
        validate.check_compressed("c", str(bad), full=True)  # ...the CRC check does
    not_gz = tmp_path / "junk.nii.gz"
    not_gz.write_bytes(b"junk" * 100)
    with pytest.raises(CaseError, match="corrupt"):
        validate.check_compressed("c", str(not_gz))


def test_multi_member_gzip_is_not_mistaken_for_truncation(tmp_path: Path) -> None:
    p = tmp_path / "x.nii.gz"
    _nifti(p)
    raw = gzip.decompress(p.read_bytes())
    half = len(raw) // 2
    p.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    validate.check_compressed("c", str(p))
    validate.check_compressed("c", str(p), full=True)


def test_channel_count_as_the_reader_returns_it() -> None:
    dj = {"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}
    validate.check_channel_count("a", ["/d/a_0000.nii.gz", "/d/a_0001.nii.gz"], 2, dj)
    with pytest.raises(CaseError, match="missing a_0001.nii.gz"):
        validate.check_channel_count("a", ["/d/a_0000.nii.gz"], 1, dj)
    with pytest.raises(CaseError, match="unexpected a_0003.nii.gz"):
        validate.check_channel_count("a", ["/d/a_0000.nii.gz", "/d/a_0001.nii.gz", "/d/a_0003.nii.gz"], 3, dj)
    # one RGB file is three channels, as NaturalImage2DIO reads it: no file is missing
    rgb = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".png"}
    validate.check_channel_count("a", ["/d/a_0000.png"], 3, rgb, [3])
    with pytest.raises(CaseError, match=r"1 image channel\(s\) in 1 file\(s\) \(a_0000.png: 1\) but dataset.json "
                                        "declares 3: missing a_0001.png, a_0002.png"):
        validate.check_channel_count("a", ["/d/a_0000.png"], 1, rgb, [1])
    with pytest.raises(CaseError, match=r"4 image channel\(s\) in 1 file\(s\) \(a_0000.png: 4\) but dataset.json "
                                        "declares 3") as e:
        validate.check_channel_count("a", ["/d/a_0000.png"], 4, rgb, [4])
    assert "missing" not in str(e.value)


def test_channel_numbering_with_a_gap_is_noticed() -> None:
    assert validate.channel_numbering(["/d/a_0000.png", "/d/a_0001.png"], ".png") is None
    assert "_0000, _0002" in validate.channel_numbering(["/d/a_0000.png", "/d/a_0002.png"], ".png")
    assert validate.channel_numbering(["/d/scan.png"], ".png") is None  # an explicit file list: any names


def test_declared_labels_include_regions_and_ignore() -> None:
    dj = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3, "ignore": 4}}
    assert validate.declared_labels(dj) == [0, 1, 2, 3, 4]


def test_check_label_messages() -> None:
    seg = np.zeros((1, 4, 5, 6), dtype=np.float32)
    validate.check_label("c", ["i"], "l", (4, 5, 6), (1, 1, 1), seg, (1, 1, 1), [0, 1])
    with pytest.raises(CaseError, match=r"label shape \(4, 5, 7\) differs from image shape \(4, 5, 6\)"):
        validate.check_label("c", ["i"], "l", (4, 5, 6), (1, 1, 1), np.zeros((1, 4, 5, 7)), (1, 1, 1), [0, 1])
    with pytest.raises(CaseError, match="spacing"):
        validate.check_label("c", ["i"], "l", (4, 5, 6), (1, 1, 1), seg, (1, 1, 2), [0, 1])
    seg[0, 1, 1, 1] = 7
    with pytest.raises(CaseError, match=r"label values \[7\] are not declared"):
        validate.check_label("c", ["i"], "l", (4, 5, 6), (1, 1, 1), seg, (1, 1, 1), [0, 1])
    with pytest.raises(CaseError, match="no voxels"):
        validate.check_label("c", ["i"], "l", (0, 5, 6), (1, 1, 1), np.zeros((1, 0, 5, 6)), (1, 1, 1), [0])


def test_blobs_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    obj = ((10, 20, 30), [1.0, 0.5, 0.5],
           [rng.normal(size=1000).astype(np.float32), np.round(rng.normal(size=500)).astype(np.float32), []],
           [{"mean": np.float64(1.5), "median": np.nan}], np.float64(0.83))
    data = blobs.dumps(obj, summary=[(1000, "float32")])
    back = blobs.loads(data)
    assert back[0] == obj[0] and back[1] == obj[1] and back[4] == obj[4] and type(back[4]) is np.float64
    for a, b in zip(obj[2], back[2]):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert a == b
    assert np.isnan(back[3][0]["median"])
    with pytest.raises(ValueError):
        blobs.loads(b"not a blob")


def test_blob_summary_is_read_without_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "x.blob"
    p.write_bytes(blobs.dumps(np.zeros(10_000_000, dtype=np.float32), summary={"n": 10_000_000}))
    assert blobs.read_summary(str(p)) == {"n": 10_000_000}
