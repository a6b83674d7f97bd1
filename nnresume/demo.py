"""Synthetic nnU-Net datasets for the demo, the tests and the benchmarks.

Each case is a CT-like volume with an ellipsoid "organ" (label 1) holding a smaller "lesion" (label 2), a zero border
(so nnU-Net's crop-to-nonzero has work to do) and a spacing drawn from a small set that mixes isotropic and
anisotropic voxels (the anisotropic ones take nnU-Net's separate-z resampling path). Everything is derived from a seed,
so two calls with the same arguments write byte-identical files.

This module needs SimpleITK (a dependency of nnunetv2) but not nnunetv2 itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPACINGS: tuple[tuple[float, float, float], ...] = (
    # (z, y, x) as numpy sees them; SimpleITK takes (x, y, z)
    (1.0, 0.8, 0.8),
    (3.0, 0.75, 0.75),
    (1.5, 1.0, 1.0),
    (2.5, 0.7, 0.7),
)


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. Shapes are (z, y, x) ranges; each case draws its own shape inside them."""

    dataset_id: int = 999
    name: str = "Demo"
    num_cases: int = 8
    channels: tuple[str, ...] = ("CT",)
    min_shape: tuple[int, int, int] = (24, 48, 48)
    max_shape: tuple[int, int, int] = (40, 80, 80)
    seed: int = 0
    file_ending: str = ".nii.gz"

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"


def case_name(spec: DemoSpec, index: int) -> str:
    return f"{spec.name.lower()}_{index:04d}"


def _case_arrays(spec: DemoSpec, index: int) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float, float]]:
    rng = np.random.default_rng([spec.seed, index])
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(spec.min_shape, spec.max_shape))
    spacing = SPACINGS[index % len(SPACINGS)]
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape), indexing="ij")

    centre = rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
    radii = rng.uniform(0.35, 0.6, size=3).astype(np.float32)
    organ = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 < 1
    lesion_centre = centre + rng.uniform(-0.15, 0.15, size=3).astype(np.float32)
    lesion_r = radii * rng.uniform(0.2, 0.35)
    lesion = (((z - lesion_centre[0]) / lesion_r[0]) ** 2 + ((y - lesion_centre[1]) / lesion_r[1]) ** 2
              + ((x - lesion_centre[2]) / lesion_r[2]) ** 2) < 1
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[organ & lesion] = 2

    body = (y / 0.95) ** 2 + (x / 0.95) ** 2 < 1
    border = max(1, shape[1] // 12)
    body[:, :border] = False
    body[:, -border:] = False

    images = []
    for c, channel in enumerate(spec.channels):
        crng = np.random.default_rng([spec.seed, index, c])
        if channel.upper() == "CT":
            img = np.full(shape, -1000.0, dtype=np.float32)
            img[body] = crng.normal(-50, 30, size=int(body.sum()))
            img[organ] = crng.normal(60 + 5 * index % 7, 15, size=int(organ.sum()))
            img[organ & lesion] = crng.normal(120, 20, size=int((organ & lesion).sum()))
            img = np.round(img).astype(np.int16)
        else:
            img = np.zeros(shape, dtype=np.float32)
            img[body] = crng.normal(200, 40, size=int(body.sum()))
            img[organ] = crng.normal(500 + 10 * c, 60, size=int(organ.sum()))
            img[organ & lesion] = crng.normal(900, 80, size=int((organ & lesion).sum()))
            img = np.clip(img, 0, None).astype(np.float32)
        img[:, :border] = 0
        img[:, -border:] = 0
        images.append(img)
    label[~body] = 0
    return images, label, spacing


def _write(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing)))
    image.SetOrigin((0.0, 0.0, 0.0))
    # SimpleITK picks its writer from the file ending, so the temporary name keeps it
    tmp = path.with_name(".part-" + path.name)
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def write_case(spec: DemoSpec, dataset_folder: Path, index: int) -> str:
    """Writes one case's image and label files; returns its identifier."""
    name = case_name(spec, index)
    images, label, spacing = _case_arrays(spec, index)
    for c, img in enumerate(images):
        _write(img, spacing, dataset_folder / "imagesTr" / f"{name}_{c:04d}{spec.file_ending}")
    _write(label, spacing, dataset_folder / "labelsTr" / f"{name}{spec.file_ending}")
    return name


def dataset_json(spec: DemoSpec) -> dict:
    return {
        "channel_names": {str(i): c for i, c in enumerate(spec.channels)},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": spec.num_cases,
        "file_ending": spec.file_ending,
        "name": spec.name,
        "description": "Synthetic dataset generated by nnresume for demos and tests.",
    }


def write_dataset_json(spec: DemoSpec, dataset_folder: Path) -> None:
    path = dataset_folder / "dataset.json"
    tmp = path.with_name("dataset.json.part")
    tmp.write_text(json.dumps(dataset_json(spec), indent=4))
    os.replace(tmp, path)


def make_dataset(spec: DemoSpec, raw_root: Path) -> Path:
    """Creates `raw_root/DatasetXXX_Name` with `spec.num_cases` cases. Returns the dataset folder."""
    folder = Path(raw_root) / spec.folder_name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(spec.num_cases):
        write_case(spec, folder, i)
    write_dataset_json(spec, folder)
    return folder
