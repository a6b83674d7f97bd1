"""geometry.py's header rules give what each of nnU-Net's readers returns (channels, axes, spacing)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from nnresume.synthetic import DemoSpec, make_dataset

from .test_readers import CELLS


def test_reader_geometry_rules_match_the_readers(tmp_path: Path) -> None:
    """For every cell of the reader matrix, the first case's header read as its reader would read it."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnresume.dataset import list_cases
    from nnresume.geometry import geometry, read_header

    for cell, spec in CELLS.items():
        raw = tmp_path / cell
        make_dataset(DemoSpec(**{**spec.__dict__, "num_cases": 1}), raw)
        ds = raw / spec.folder_name
        dj = json.loads((ds / "dataset.json").read_text())
        (files,) = list_cases(ds, dj).values()
        reader = determine_reader_writer_from_dataset_json(dj, files.images[0], verbose=False)
        data, props = reader().read_images(list(files.images))
        seg, seg_props = reader().read_seg(files.label)
        geos = [geometry(read_header(p), reader.__name__, p) for p in files.images]
        assert all(g is not None for g in geos), cell
        assert sum(g.channels for g in geos) == data.shape[0], cell
        assert geos[0].shape == data.shape[1:], cell
        assert np.allclose(geos[0].spacing, props["spacing"]), cell
        label = geometry(read_header(files.label), reader.__name__, files.label, "label")
        assert label is not None and label.shape == seg.shape[1:] and np.allclose(label.spacing, seg_props["spacing"])
    shutil.rmtree(tmp_path)


def test_png_channels_of_every_pil_mode_as_nnunets_reader_counts_them(tmp_path: Path) -> None:
    """Grey, 1-bit, 16-bit, RGB, RGBA, and palette images with and without a transparent entry
    (VOC-style label maps are palette PNGs): the header rule gives the channels NaturalImage2DIO returns. (Grey
    with alpha it refuses: two values per pixel are neither grey nor RGB(A).)"""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from PIL import Image

    from nnresume.geometry import NATURAL_2D, geometry, natural_image_channels, read_header

    a = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    palette = Image.new("P", (30, 20))
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0])
    palette.putdata(list((a % 4).flatten()))
    images = {
        "grey": (Image.fromarray(a), {}),
        "bits": (Image.fromarray(a > 128), {}),
        "grey16": (Image.fromarray(a.astype(np.uint16) * 200), {}),
        "rgb": (Image.fromarray(np.stack([a] * 3, -1)), {}),
        "rgba": (Image.fromarray(np.stack([a] * 4, -1)), {}),
        "palette": (palette, {}),
        "palette-transparent": (palette, {"transparency": 0}),
        "palette-of-grey": (Image.fromarray(a % 4).convert("P"), {}),
    }
    for name, (image, options) in images.items():
        path = str(tmp_path / f"{name}.png")
        image.save(path, **options)
        data, _ = NaturalImage2DIO().read_images([path])
        assert natural_image_channels(path) == data.shape[0], name
        geo = geometry(read_header(path), NATURAL_2D, path)
        assert geo is not None and geo.channels == data.shape[0] and geo.shape == data.shape[1:], name
