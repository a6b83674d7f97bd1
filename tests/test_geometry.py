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
