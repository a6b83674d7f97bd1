"""Image geometry read from file headers, told the way nnU-Net's readers tell it, without importing nnunetv2.

The orchestrator sizes memory estimates from headers before any worker has read a case, and `nnresume check` compares
channels and labels from headers without reading pixels. Both must count as nnU-Net's reader will: every reader
returns images as `(c, x, y, z)` with three spacings (`BaseReaderWriter.read_images`), so

- a 2D image is `(c, 1, h, w)`: NaturalImage2DIO gives spacing `(999, 1, 1)`, SimpleITKIO `(999 * max, sy, sx)`;
- NaturalImage2DIO reads one RGB(A) file as 3 (4) channels, and a palette PNG as 3 (skimage expands it);
- SimpleITKIO reads a 4D file as as many channels as its first axis;
- Tiff3DIO reads spacing from `<case>.json` beside the image, else `(1, 1, 1)`;
- NibabelIO gives the same axes as SimpleITK (it transposes nibabel's order to match).

`tests/test_geometry.py` checks each rule against the reader itself. A header that cannot be read gives None; callers
then fall back to a safe estimate (memory) or say so (check); the worker, which reads the pixels, has the last word.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

NATURAL_2D = "NaturalImage2DIO"
TIFF_3D = "Tiff3DIO"
NATURAL_ENDINGS = (".png", ".bmp", ".tif")
TIFF_ENDINGS = (".tif", ".tiff")
# PIL modes as skimage.io.imread returns them: values per pixel (a palette image comes back in its palette's mode,
# `_pil_channels`)
_PIL_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 2, "PA": 2, "RGB": 3,
                 "RGBA": 4, "CMYK": 4, "YCbCr": 3}


def _pil_channels(im: Any) -> Optional[int]:
    """Values per pixel skimage.io.imread returns for an open PIL image: imageio's pillow plugin converts a palette
    image to its palette's mode (RGB, or RGBA), whatever transparency the file declares."""
    mode = im.mode
    if mode == "P":
        palette = getattr(im, "palette", None)
        mode = getattr(palette, "mode", None) or "RGB"
    return _PIL_CHANNELS.get(mode)


@dataclass(frozen=True)
class Geometry:
    """A file as nnU-Net's reader returns it: channels, spatial shape (x, y, z) and spacing, 2D as (1, h, w)."""

    channels: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> Optional[dict[str, Any]]:
    """Shape and spacing (numpy order) and values per pixel, without reading pixels; None when unreadable.

    SimpleITK reads the headers of every format nnU-Net's readers take; a multi-page TIFF it cannot size is sized by
    tifffile from its tags.
    """
    if path.lower().endswith((".png", ".bmp")):
        # PIL reads the few header bytes; SimpleITK's PNG reader decodes the image for its information (~2 ms each)
        try:
            from PIL import Image

            with Image.open(path) as im:
                components = _pil_channels(im)
                if components is not None:
                    return {"shape": [im.height, im.width], "spacing": [1.0, 1.0], "components": components,
                            "direction": [1.0, 0.0, 0.0, 1.0]}
        except Exception:
            pass
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return {"shape": list(reversed(reader.GetSize())), "spacing": list(reversed(reader.GetSpacing())),
                "components": reader.GetNumberOfComponents(), "direction": list(reader.GetDirection())}
    except Exception:  # a header we cannot read is not an error here: the worker reports it properly
        pass
    if path.lower().endswith(TIFF_ENDINGS):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = list(tif.series[0].shape)
            return {"shape": shape, "spacing": [1.0] * len(shape), "components": 1}
        except Exception:
            return None
    return None


def header_voxels(header: Optional[dict[str, Any]]) -> Optional[int]:
    """Values in the file (voxels times values per voxel), whatever its axes mean; None without a header."""
    if not header or not header.get("shape"):
        return None
    return max(1, math.prod(int(s) for s in header["shape"])) * max(1, int(header.get("components") or 1))


def natural_image_channels(path: str) -> Optional[int]:
    """Channels NaturalImage2DIO returns for a 2D file (skimage.io.imread's view of it), from the PIL mode."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return _pil_channels(im)
    except Exception:
        return None


def _tiff_spacing(path: str, role: str) -> tuple[float, float, float]:
    """Tiff3DIO's auxiliary file: `<case>.json` for `<case>_0000.tif` (it cuts five characters), `<case>.json`
    for a label `<case>.tif`."""
    ending = "." + path.split(".")[-1]
    aux = path[:-(len(ending) + (5 if role == "image" else 0))] + ".json"
    try:
        with open(aux) as f:
            spacing = json.load(f)["spacing"]
        return (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    except Exception:
        return (1.0, 1.0, 1.0)


def geometry(header: Optional[dict[str, Any]], reader: Optional[str], path: str = "", role: str = "image"
             ) -> Optional[Geometry]:
    """What `reader` will return for the file with this header; None when the rule does not apply (the reader
    would refuse the file, or is not one of nnU-Net's)."""
    if not header or not header.get("shape"):
        return None
    dims = [int(s) for s in header["shape"]]
    spacing = [abs(float(s)) for s in header.get("spacing") or [1.0] * len(dims)]
    components = int(header.get("components") or 1)
    if reader == NATURAL_2D:
        if len(dims) != 2:
            return None
        channels = natural_image_channels(path) if path else None
        return Geometry(channels or (components if components in (3, 4) else 1), (1, dims[0], dims[1]),
                        (999.0, 1.0, 1.0))
    if reader == TIFF_3D:
        if len(dims) != 3:
            return None
        return Geometry(1, (dims[0], dims[1], dims[2]), _tiff_spacing(path, role) if path else (1.0, 1.0, 1.0))
    if reader in REORIENTING and header.get("direction") and len(dims) == 3:
        dims, spacing = _reoriented(dims, spacing, header["direction"])
    # SimpleITK's readers, nibabel's (same axes), and anything else shaped like them
    if components > 1:  # GetArrayFromImage puts vector components on a last axis
        dims = dims + [components]
        spacing = spacing + [1.0]
    if len(dims) == 2:
        return Geometry(1, (1, dims[0], dims[1]), (999.0 * max(spacing), spacing[0], spacing[1]))
    if len(dims) == 3:
        return Geometry(1, (dims[0], dims[1], dims[2]), (spacing[0], spacing[1], spacing[2]))
    if len(dims) == 4:
        return Geometry(dims[0], (dims[1], dims[2], dims[3]), (spacing[1], spacing[2], spacing[3]))
    return None


REORIENTING = ("SimpleITKIOWithReorient", "NibabelIOWithReorient")


def _reoriented(dims: list[int], spacing: list[float], direction: list[float]) -> tuple[list[int], list[float]]:
    """Axes after reorienting to the closest canonical orientation (RAS), as the reorienting readers do: each
    image axis goes to the physical axis its direction is closest to. Flips do not change the shape."""
    n = len(dims)
    itk_size, itk_spacing = list(reversed(dims)), list(reversed(spacing))  # ITK's (x, y, z) order
    size, sp = list(itk_size), list(itk_spacing)
    taken: set[int] = set()
    for j in range(n):
        column = [abs(direction[i * n + j]) for i in range(n)]
        target = max((i for i in range(n) if i not in taken), key=lambda i: column[i])
        taken.add(target)
        size[target], sp[target] = itk_size[j], itk_spacing[j]
    return list(reversed(size)), list(reversed(sp))


def likely_reader(file_ending: str, header: Optional[dict[str, Any]], overwrite: Optional[str] = None) -> Optional[str]:
    """The reader nnU-Net would most likely pick for files with this ending (it tries them on an example file in
    the order of its registry), from the header alone. Used where no worker has asked nnU-Net yet."""
    if overwrite and overwrite != "None":
        return overwrite
    ending = file_ending.lower()
    dims = len(header["shape"]) if header and header.get("shape") else None
    if ending in NATURAL_ENDINGS and dims in (None, 2):
        return NATURAL_2D
    if ending in (".nii.gz", ".nrrd", ".mha", ".gipl"):
        return "SimpleITKIO"
    if ending in TIFF_ENDINGS:
        return TIFF_3D
    if ending == ".nii":
        return "NibabelIO"
    return None
