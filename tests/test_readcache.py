"""The read cache (worker/readcache.py): the fingerprint stage keeps a case exactly as nnU-Net's reader returned it,
before nnU-Net's cropping alters the segmentation in place, and the preprocessing stage uses it only for the same
files read by the same reader, once. Real files, nnU-Net's real reader and fingerprint extractor."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnresume.tasks import FingerprintResult, FingerprintTask
from nnresume.worker import readcache
from nnresume.worker.run import _file_stats, run_fingerprint


def _write(path: Path, arr: np.ndarray) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path))


def _case(tmp_path: Path) -> tuple[str, str]:
    image = np.zeros((12, 20, 24), dtype=np.float32)
    image[2:10, 4:16, 5:20] = np.arange(8 * 12 * 15, dtype=np.float32).reshape(8, 12, 15) + 1
    image[2:5, 4:8, 5:9] = 0  # background inside the bounding box: nnU-Net's cropping labels it -1 in the seg
    seg = np.zeros(image.shape, dtype=np.uint8)
    seg[4:8, 6:12, 8:14] = 1
    _write(tmp_path / "c_0000.nii.gz", image)
    _write(tmp_path / "c.nii.gz", seg)
    return str(tmp_path / "c_0000.nii.gz"), str(tmp_path / "c.nii.gz")


def _fingerprint(tmp_path: Path, image: str, label: str, cache: str) -> FingerprintResult:
    shutil.rmtree(tmp_path / "staging", ignore_errors=True)
    (tmp_path / "staging").mkdir()
    task = FingerprintTask(task_id="t", case="c", files=(("image", 0, image), ("label", 0, label)),
                           extractor="DatasetFingerprintExtractor", reader_writer="SimpleITKIO", num_samples=100,
                           staging=str(tmp_path / "staging" / "t-1"),
                           dataset_json={"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                         "file_ending": ".nii.gz", "numTraining": 1},
                           read_cache=cache)
    sent: list = []
    run_fingerprint(task, sent.append)
    (result,) = sent
    assert isinstance(result, FingerprintResult), result
    return result


def test_the_cache_holds_the_read_before_cropping_and_serves_once(tmp_path: Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    image, label = _case(tmp_path)
    cache = str(tmp_path / "reads" / "c.pkl")
    result = _fingerprint(tmp_path, image, label, cache)
    assert os.path.isfile(cache)

    data, props = SimpleITKIO().read_images([image])
    seg, _ = SimpleITKIO().read_seg(label)
    assert not (seg < 0).any()
    cropped = seg.copy()
    crop_to_nonzero(data.copy(), cropped)
    assert (cropped < 0).any()  # nnU-Net's cropping alters the segmentation it is given, in place

    stats = _file_stats(result.files)
    assert readcache.load(cache, "NibabelIO", stats) is None  # another reader: not used (and removed)
    assert not os.path.exists(cache)

    _fingerprint(tmp_path, image, label, cache)
    touched = [(p, s, m + 1) for p, s, m in stats]
    assert readcache.load(cache, "SimpleITKIO", touched) is None  # files changed since: not used

    _fingerprint(tmp_path, image, label, cache)
    loaded = readcache.load(cache, "SimpleITKIO", stats)
    assert loaded is not None
    c_data, c_seg, c_props = loaded
    assert c_data.dtype == data.dtype and np.array_equal(c_data, data)
    assert c_seg.dtype == seg.dtype and np.array_equal(c_seg, seg)
    assert c_props["spacing"] == props["spacing"]
    assert c_props["sitk_stuff"] == props["sitk_stuff"]
    assert not os.path.exists(cache)  # one use
    assert readcache.load(cache, "SimpleITKIO", stats) is None


def test_no_cache_unless_asked(tmp_path: Path) -> None:
    image, label = _case(tmp_path)
    _fingerprint(tmp_path, image, label, "")
    assert not (tmp_path / "reads").exists()
