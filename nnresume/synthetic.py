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
from typing import Optional

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
    """What to generate. Shapes are (z, y, x) ranges; each case draws its own shape inside them.

    Beyond the default (3D CT-like NIfTI in imagesTr/labelsTr), the layouts nnU-Net's documentation describes:
    - `ndim=2`: each case is one 2D image of the shapes' (y, x); written as PNG, BMP or TIFF (natural images, grey
      values 0-255) or, for the medical endings, as a 2D image SimpleITK writes.
    - `colour=3` or `4`: natural images with R, G, B (and A) in one file per case, as NaturalImage2DIO reads them;
      the channel names are then R, G, B(, A).
    - `.tif`/`.tiff` with `ndim=3`: 3D TIFF with the `<case>.json` spacing file Tiff3DIO reads.
    - `layout="list"`: dataset.json names each case's files (`"dataset": {...}`), relative to the dataset folder or,
      with `absolute_paths`, absolute.
    - `labels="regions"` (region-based training with `regions_class_order`) or `"ignore"` (an ignore label).
    - `reader`: written to dataset.json as `overwrite_image_reader_writer`; `oblique` gives the images a direction
      other than the identity (what the reorienting readers change).
    """

    dataset_id: int = 999
    name: str = "Demo"
    num_cases: int = 8
    channels: tuple[str, ...] = ("CT",)
    min_shape: tuple[int, int, int] = (24, 48, 48)
    max_shape: tuple[int, int, int] = (40, 80, 80)
    seed: int = 0
    file_ending: str = ".nii.gz"
    ndim: int = 3
    colour: int = 1
    layout: str = "folders"
    absolute_paths: bool = False
    labels: str = "plain"
    reader: Optional[str] = None
    oblique: bool = False

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    @property
    def channel_names(self) -> tuple[str, ...]:
        return ("R", "G", "B", "A")[:self.colour] if self.colour > 1 else self.channels


def case_name(spec: DemoSpec, index: int) -> str:
    return f"{spec.name.lower()}_{index:04d}"


def _case_arrays(spec: DemoSpec, index: int) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float, float]]:
    rng = np.random.default_rng([spec.seed, index])
    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(spec.min_shape, spec.max_shape))
    spacing = SPACINGS[index % len(SPACINGS)]
    # a single slice (2D cases) is the middle of the volume
    z, y, x = np.meshgrid(*(np.linspace(-1.0, 1.0, s, dtype=np.float32) if s > 1 else np.zeros(1, np.float32)
                            for s in shape), indexing="ij")

    centre = rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
    radii = rng.uniform(0.35, 0.6, size=3).astype(np.float32)
    organ = (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
             + ((x - centre[2]) / radii[2]) ** 2) < 1
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


NATURAL_ENDINGS = (".png", ".bmp")
TIFF_ENDINGS = (".tif", ".tiff")
OBLIQUE_DIRECTION = (0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0)  # a permutation with a flip: not RAS


def _natural(array: np.ndarray) -> np.ndarray:
    """Grey values 0-255, as a photograph or a microscopy tile would have them."""
    a = array.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.round((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)


def _write_sitk(array: np.ndarray, spacing: tuple[float, ...], path: Path, oblique: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin((0.0,) * array.ndim)
    if oblique and array.ndim == 3:
        image.SetDirection(OBLIQUE_DIRECTION)
    # SimpleITK picks its writer from the file ending, so the temporary name keeps it
    tmp = path.with_name(".part-" + path.name)
    sitk.WriteImage(image, str(tmp), useCompression=not path.name.endswith(".gipl"))
    os.replace(tmp, path)


def _write_plain(array: np.ndarray, path: Path) -> None:
    """PNG, BMP or TIFF without geometry (natural images and Tiff3DIO's volumes)."""
    tmp = path.with_name(".part-" + path.name)
    if path.name.endswith(TIFF_ENDINGS):
        import tifffile

        tifffile.imwrite(tmp, array, compression="zlib")
    else:
        from PIL import Image

        Image.fromarray(array).save(tmp, format="PNG" if path.name.endswith(".png") else "BMP")
    os.replace(tmp, path)


def _write_spacing_json(spacing: tuple[float, ...], path: Path) -> None:
    path.write_text(json.dumps({"spacing": [float(s) for s in spacing]}))


def _files(spec: DemoSpec, dataset_folder: Path, name: str) -> tuple[list[Path], Path]:
    n = 1 if spec.colour > 1 else len(spec.channels)
    if spec.layout == "list":
        folder = dataset_folder / "data" / name
        return [folder / f"scan_{c}{spec.file_ending}" for c in range(n)], folder / f"mask{spec.file_ending}"
    return ([dataset_folder / "imagesTr" / f"{name}_{c:04d}{spec.file_ending}" for c in range(n)],
            dataset_folder / "labelsTr" / f"{name}{spec.file_ending}")


def _labels(spec: DemoSpec, label: np.ndarray) -> np.ndarray:
    if spec.labels == "ignore":
        label = label.copy()
        label[..., : max(1, label.shape[-1] // 8)] = 3  # a stripe nobody annotated
    return label


def write_case(spec: DemoSpec, dataset_folder: Path, index: int) -> str:
    """Writes one case's image and label files; returns its identifier."""
    name = case_name(spec, index)
    images, label, spacing = _case_arrays(spec, index)
    image_paths, label_path = _files(spec, dataset_folder, name)
    for p in [*image_paths, label_path]:
        p.parent.mkdir(parents=True, exist_ok=True)
    label = _labels(spec, label)
    ending = spec.file_ending
    spacing_: tuple[float, ...] = spacing
    if spec.ndim == 2:
        images, label = [i[0] for i in images], label[0]
        spacing_ = spacing[1:]
    if ending in NATURAL_ENDINGS or (ending in TIFF_ENDINGS and spec.ndim == 2):
        grey = [_natural(i) for i in images]
        if spec.colour > 1:
            g = grey[0]
            planes = [g, 255 - g, np.roll(g, g.shape[1] // 3, axis=1), np.full_like(g, 255)][:spec.colour]
            grey = [np.stack(planes, axis=-1)]
        for img, p in zip(grey, image_paths):
            _write_plain(img, p)
        _write_plain(label.astype(np.uint8), label_path)
    elif ending in TIFF_ENDINGS:
        for img, p in zip(images, image_paths):
            _write_plain(img, p)
        _write_plain(label, label_path)
        # Tiff3DIO reads the spacing of <case>_0000.tif from <case>.json, of a label <case>.tif from <case>.json
        _write_spacing_json(spacing_, image_paths[0].with_name(name + ".json"))
        _write_spacing_json(spacing_, label_path.with_name(name + ".json"))
    else:
        for img, p in zip(images, image_paths):
            _write_sitk(img, spacing_, p, spec.oblique)
        _write_sitk(label, spacing_, label_path, spec.oblique)
    return name


def dataset_json(spec: DemoSpec, dataset_folder: Optional[Path] = None) -> dict:
    labels: dict = {"background": 0, "organ": 1, "lesion": 2}
    content: dict = {
        "channel_names": {str(i): c for i, c in enumerate(spec.channel_names)},
        "labels": labels,
        "numTraining": spec.num_cases,
        "file_ending": spec.file_ending,
        "name": spec.name,
        "description": "Synthetic dataset generated by nnresume for demos and tests.",
    }
    if spec.labels == "regions":
        content["labels"] = {"background": 0, "organ": [1, 2], "lesion": 2}
        content["regions_class_order"] = [1, 2]
    elif spec.labels == "ignore":
        labels["ignore"] = 3
    if spec.reader:
        content["overwrite_image_reader_writer"] = spec.reader
    if spec.layout == "list":
        root = Path(dataset_folder).resolve() if dataset_folder is not None else Path(".")
        entries = {}
        for i in range(spec.num_cases):
            name = case_name(spec, i)
            images, label = _files(spec, root, name)
            if not spec.absolute_paths:
                images, label = [p.relative_to(root) for p in images], label.relative_to(root)
            entries[name] = {"images": [str(p) for p in images], "label": str(label)}
        content["dataset"] = entries
    return content


def write_dataset_json(spec: DemoSpec, dataset_folder: Path) -> None:
    path = dataset_folder / "dataset.json"
    tmp = path.with_name("dataset.json.part")
    tmp.write_text(json.dumps(dataset_json(spec, dataset_folder), indent=4))
    os.replace(tmp, path)


def make_dataset(spec: DemoSpec, raw_root: Path) -> Path:
    """Creates `raw_root/DatasetXXX_Name` with `spec.num_cases` cases. Returns the dataset folder."""
    folder = Path(raw_root) / spec.folder_name
    if spec.layout != "list":
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(spec.num_cases):
        write_case(spec, folder, i)
    write_dataset_json(spec, folder)
    return folder
