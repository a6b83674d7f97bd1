"""Per-case input checks, run inside workers as a case is read, so that bad input fails with one clear message
naming the case, the file and the cause, instead of an IndexError deep inside nnU-Net's normalisation.

The checks wrap nnU-Net's reader/writer class rather than reading files a second time: `validating_reader` returns a
subclass whose `read_images`/`read_seg` check what they return. Any fingerprint extractor or preprocessor that reads
through the reader class it is given is checked for free.

What is an error (the case fails): a missing, empty, unreadable or corrupt file; a channel count other than
dataset.json's; image and label of different shape or spacing (nnU-Net's `np.allclose` tolerance); NaN or infinite
image values; label values dataset.json does not declare; a label with no voxels.
A truncated `.nii.gz` is caught before reading: ITK's NIfTI reader fills the missing part with zeros without a word
(nnU-Net would train on it), so the gzip trailer's size field is compared with what the NIfTI header says the data
holds, and on a mismatch the whole stream is decompressed to confirm. ITK also turns NaN and infinities in NIfTI files
into zeros; those checks therefore apply to what the reader returns, as nnU-Net would see it.
What is not: a label with only background. nnU-Net accepts those (cases without foreground are legitimate);
`nnresume check` reports them as a warning.
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from .errors import CaseError

T = TypeVar("T")


def declared_labels(dataset_json: dict[str, Any]) -> list[int]:
    """Every label value dataset.json declares, regions flattened, the ignore label included."""
    values: set[int] = set()
    for v in dataset_json.get("labels", {}).values():
        if isinstance(v, (list, tuple)):
            values.update(int(i) for i in v)
        else:
            values.add(int(v))
    return sorted(values)


def _nifti_data_size(header: bytes) -> Optional[int]:
    """Bytes a NIfTI-1/2 file holds (vox_offset + voxels x bytes per voxel), from its first 540 bytes."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = struct.unpack(endian + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        n = dims[0]
        if not 1 <= n <= 7 or bitpix <= 0:
            return None
        voxels = 1
        for d in dims[1:n + 1]:
            voxels *= max(int(d), 1)
        return int(offset) + voxels * bitpix // 8
    return None


def gzip_stream_error(path: str) -> Optional[str]:
    """Decompresses the whole gzip stream; None if complete and its CRC matches, else what is wrong."""
    d = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                while chunk:
                    d.decompress(chunk, 0)
                    chunk = d.unused_data if d.eof else b""
                    if chunk:  # a further gzip member
                        d = zlib.decompressobj(wbits=31)
    except zlib.error as e:
        return f"corrupt compressed data ({e})"
    return None if d.eof else "the compressed stream ends early (the file was cut short)"


def check_compressed(case: str, path: str, full: bool = False) -> None:
    """A truncated or corrupt `.gz` input fails here instead of being read as zeros."""
    if not path.endswith(".gz"):
        return
    if not full and path.endswith(".nii.gz"):
        try:
            with open(path, "rb") as f:
                head = zlib.decompressobj(wbits=31).decompress(f.read(1 << 16), 540)
                f.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", f.read(4))[0]
        except (OSError, zlib.error) as e:
            raise CaseError(case, f"file is corrupt: cannot decompress its header ({e})", path) from None
        expected = _nifti_data_size(head)
        if expected is not None and expected % (1 << 32) == isize:
            return
    error = gzip_stream_error(path)
    if error:
        raise CaseError(case, f"file is truncated or corrupt: {error}", path,
                        "copy the file again from its source")


def check_channel_files(case: str, images: Sequence[str], dataset_json: dict[str, Any] | None) -> None:
    """One image file per channel of dataset.json, named <case>_0000, <case>_0001, ...; names what is off."""
    if not dataset_json:
        return
    expected = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not expected or len(images) == expected:
        return
    ending = dataset_json.get("file_ending", "")
    folder = os.path.dirname(images[0]) if images else ""
    want = {f"{case}_{i:04d}{ending}" for i in range(expected)}
    have = {os.path.basename(p) for p in images}
    missing, extra = sorted(want - have), sorted(have - want)
    detail = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                   f"unexpected {', '.join(extra)}" if extra else "") if x)
    raise CaseError(case, f"{len(images)} image channel file(s) but dataset.json declares {expected}"
                          + (f": {detail}" if detail else ""), folder or None,
                    "each case needs exactly one file per channel: <case>_0000, <case>_0001, ...")


def before_read(case: str, images: Sequence[str], label: str | None,
                dataset_json: dict[str, Any] | None = None) -> None:
    """Cheap checks on the files themselves, before a reader gets them."""
    if not images:
        raise CaseError(case, "no image files found (expected <case>_0000<file_ending> in imagesTr)")
    check_channel_files(case, images, dataset_json)
    for path in [*images, *([label] if label else [])]:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CaseError(case, "file is missing", path) from None
        except OSError as e:
            raise CaseError(case, f"cannot read file: {e.strerror}", path) from None
        if size == 0:
            raise CaseError(case, "file is empty (0 bytes)", path)
        if os.path.isdir(path):
            raise CaseError(case, "is a directory, not a file", path)
        if not os.access(path, os.R_OK):
            raise CaseError(case, "file is not readable (permission denied)", path)
        check_compressed(case, path)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def check_images(case: str, images: Sequence[str], data: np.ndarray, expected_channels: int | None) -> None:
    if expected_channels is not None and data.shape[0] != expected_channels:
        raise CaseError(case, f"{data.shape[0]} image channel(s) but dataset.json declares {expected_channels}",
                        images[0], "each case needs exactly one file per channel: <case>_0000, <case>_0001, ...")
    for c in range(data.shape[0]):
        channel = data[c]
        if not np.isfinite(channel).all():
            kinds = [k for k, bad in (("NaN", np.isnan(channel).any()), ("infinite", np.isinf(channel).any())) if bad]
            path = images[c] if c < len(images) else images[0]
            raise CaseError(case, f"image has {' and '.join(kinds)} values", path,
                            "replace them with a value that makes sense for the modality")


def check_label(case: str, images: Sequence[str], label: str, data_shape: tuple, data_spacing: Any,
                seg: np.ndarray, seg_spacing: Any, allowed: Sequence[int] | None) -> None:
    if seg.size == 0:
        raise CaseError(case, "label has no voxels", label)
    if tuple(seg.shape[1:]) != tuple(data_shape):
        raise CaseError(case, f"label shape {tuple(seg.shape[1:])} differs from image shape {tuple(data_shape)}",
                        label, f"image: {images[0]}")
    if data_spacing is not None and seg_spacing is not None and not np.allclose(seg_spacing, data_spacing):
        raise CaseError(case, f"label spacing {tuple(float(s) for s in seg_spacing)} differs from image spacing "
                              f"{tuple(float(s) for s in data_spacing)}", label, f"image: {images[0]}")
    if np.isnan(seg).any():
        raise CaseError(case, "label has NaN values", label)
    if allowed is not None:
        bad = ~np.isin(seg, np.asarray(allowed, dtype=seg.dtype))
        if bad.any():
            found = np.unique(seg[bad])[:10]
            values = [int(v) if float(v).is_integer() else float(v) for v in found]
            raise CaseError(case, f"label values {values} are not declared in dataset.json "
                                  f"(declared: {list(allowed)})", label)


def validating_reader(reader_cls: type, case: str, images: Sequence[str], label: str,
                      dataset_json: dict[str, Any] | None) -> type:
    """A subclass of nnU-Net's reader/writer class that checks what it reads (see the module docstring)."""
    expected_channels = None
    allowed = None
    if dataset_json is not None:
        expected_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {}))) or None
        allowed = declared_labels(dataset_json) or None
    state: dict[str, Any] = {}

    class ValidatingReader(reader_cls):  # type: ignore[misc, valid-type]
        def read_images(self, image_fnames, *args, **kwargs):  # type: ignore[no-untyped-def]
            if state.get("in_read_seg"):
                # readers implement read_seg through read_images; the label is checked in read_seg
                return super().read_images(image_fnames, *args, **kwargs)
            try:
                data, props = super().read_images(image_fnames, *args, **kwargs)
            except Exception as e:
                culprit = _find_unreadable(super().read_images, image_fnames)
                if culprit is not None:
                    raise CaseError(case, f"cannot read image: {_describe(culprit[1])}", culprit[0]) from None
                raise CaseError(case, f"image files do not fit together: {_describe(e)}", image_fnames[0],
                                "all channels of a case need the same shape, spacing and orientation") from None
            check_images(case, image_fnames, data, expected_channels)
            state["shape"], state["spacing"] = data.shape[1:], props.get("spacing")
            return data, props

        def read_seg(self, seg_fname, *args, **kwargs):  # type: ignore[no-untyped-def]
            state["in_read_seg"] = True
            try:
                seg, props = super().read_seg(seg_fname, *args, **kwargs)
            except Exception as e:
                raise CaseError(case, f"cannot read label: {_describe(e)}", seg_fname) from None
            finally:
                state["in_read_seg"] = False
            if "shape" in state:
                check_label(case, images, seg_fname, state["shape"], state["spacing"], seg, props.get("spacing"),
                            allowed)
            return seg, props

    ValidatingReader.__name__ = reader_cls.__name__
    ValidatingReader.__qualname__ = reader_cls.__qualname__
    return ValidatingReader


def _find_unreadable(read: Callable[..., Any], files: Sequence[str]) -> tuple[str, BaseException] | None:
    for f in files:
        try:
            read([f])
        except Exception as e:
            return f, e
    return None


def wrap_nnunet_errors(case: str, stage: str, images: Sequence[str], label: str, fn: Callable[[], T]) -> T:
    """Runs `fn`; an unexpected exception becomes a CaseError naming the case, the stage and its files."""
    try:
        return fn()
    except (CaseError, MemoryError):
        raise
    except OSError as e:
        if e.filename:
            raise
        raise CaseError(case, f"{stage}: {_describe(e)}", images[0]) from e
    except Exception as e:
        files = ", ".join(os.path.basename(p) for p in [*images, label])
        raise CaseError(case, f"{stage}: {_describe(e)} (files: {files})") from e
