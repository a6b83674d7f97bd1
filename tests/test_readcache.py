"""The read cache (io/readcache.py): the fingerprint stage keeps a case exactly as nnU-Net's reader returned it,
before nnU-Net's cropping alters the segmentation in place, and the preprocessing stage uses it only for the same
files read by the same reader, once. Real files, nnU-Net's real reader and fingerprint extractor."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnresume.io import readcache
from nnresume.tasks import FingerprintResult, FingerprintTask
from nnresume.worker.files import file_stats
from nnresume.worker.run import run_fingerprint


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

    stats = file_stats(result.files)
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


# ---- the orchestrator's side (ReadCache) ---------------------------------------------------------------------------

def test_in_ram_the_cache_holds_its_allotments_against_the_budget_until_taken(tmp_path: Path) -> None:
    from nnresume.io.readcache import BYTES_PER_UNIT, ReadCache

    ram, staging = tmp_path / "ram", tmp_path / "staging"
    ram.mkdir()
    staging.mkdir()
    cache = ReadCache(staging, budget=8 * 2**20 * 8, enabled=True, ram_root=ram)  # budget / 8 = 8 MiB
    assert cache.in_ram and cache.folder.parent == ram
    assert cache.folder.name.startswith(f"nnresume-reads-{os.getpid()}-")
    units = 2**20 // BYTES_PER_UNIT  # about 1 MiB a case
    paths = [cache.allot(f"c{i}", units) for i in range(10)]
    assert all(paths[:8]) and paths[8:] == ["", ""], "no more than budget / 8 in all"
    assert cache.held == 8 * BYTES_PER_UNIT * units
    assert cache.allot("c0", units) == paths[0] and cache.held == 8 * BYTES_PER_UNIT * units, "allotted once"
    cache.taken("c0")
    cache.taken("c9")  # never allotted
    assert cache.held == 7 * BYTES_PER_UNIT * units
    cache.folder.mkdir()
    for i in (1, 2, 3):
        (cache.folder / f"c{i}.pkl").write_bytes(b"x")
    cache.keep_only({"c1", "c2"})  # the others' outputs are up to date: their copies go
    assert sorted(p.name for p in cache.folder.iterdir()) == ["c1.pkl", "c2.pkl"]
    assert cache.held == 2 * BYTES_PER_UNIT * units
    cache.remove()
    assert not cache.folder.exists() and cache.held == 0


def test_without_room_in_ram_the_cache_stays_in_staging_and_holds_nothing(tmp_path: Path) -> None:
    from nnresume.io.readcache import ReadCache

    cache = ReadCache(tmp_path, budget=2**50, enabled=True, ram_root=tmp_path / "missing")
    assert not cache.in_ram and cache.folder == tmp_path / "reads"
    assert cache.allot("c", 1000) == str(tmp_path / "reads" / "c.pkl") and cache.held == 0
    remote = ReadCache(tmp_path, budget=2**30, enabled=False, ram_root=tmp_path)
    assert remote.allot("c", 1000) == "", "workers on other machines keep nothing"


def test_folders_of_runs_that_are_gone_are_removed_and_a_live_runs_kept(tmp_path: Path) -> None:
    import subprocess

    import psutil

    from nnresume.io.readcache import PREFIX, remove_abandoned

    gone = subprocess.Popen(["true"])
    gone.wait()
    me = psutil.Process()
    live = tmp_path / f"{PREFIX}{me.pid}-{int(me.create_time())}"
    dead = tmp_path / f"{PREFIX}{gone.pid}-{int(me.create_time())}"
    reused = tmp_path / f"{PREFIX}{me.pid}-{int(me.create_time()) - 1000}"  # this pid, another process's start
    other = tmp_path / "something-else"
    for d in (live, dead, reused, other):
        d.mkdir()
        (d / "c.pkl").write_bytes(b"x")
    remove_abandoned(tmp_path)
    assert live.exists() and other.exists()
    assert not dead.exists() and not reused.exists()
