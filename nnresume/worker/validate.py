"""Per-case input checks, run inside workers as a case is read, so that bad input fails with one clear message
naming the case, the file and the cause, instead of an IndexError deep inside nnU-Net's normalisation.

The checks wrap nnU-Net's reader/writer class rather than reading files a second time: `validating_reader` returns a
subclass whose `read_images`/`read_seg` check what they return. Any fingerprint extractor or preprocessor that reads
through the reader class it is given is checked for free.

What is an error (the case fails), as nnU-Net would fail on it (often much later, and for the whole run): a missing,
empty, unreadable or corrupt file; a channel count other than dataset.json's, counted as the reader returns channels
(one RGB file is three); image and label of different shape or spacing (nnU-Net's `np.allclose` tolerance); NaN or
infinite values as the reader returns them (nnU-Net's fingerprint asserts there are none); label values dataset.json
does not declare; a label with no voxels.
A truncated `.nii.gz` is caught before reading: ITK's NIfTI reader fills the missing part with zeros without a word
(nnU-Net would train on it), so the gzip trailer's size field is compared with what the NIfTI header says the data
holds, and on a mismatch the whole stream is decompressed to confirm.

What is a warning (the case is preprocessed as nnU-Net would, and the warning is kept in the ledger): what nnU-Net
accepts but alters or ignores. NaN and infinities in a float NIfTI file, which ITK reads as 0 (`hidden_non_finite`
reads the file's own values with nibabel); image and label whose origin, direction or affine differ (nnU-Net's
integrity check only warns); a label with only background; channel files numbered with a gap.
"""
from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import numpy as np

from ..errors import CaseError
from ..io.readcache import Capture
from ..tasks import CaseWarning

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


def channel_numbering(images: Sequence[str], file_ending: str) -> Optional[str]:
    """A case whose channel files skip a number (`_0000`, `_0002`): nnU-Net reads them in name order as channels
    0, 1 without a word. Returns a description, or None when the files are numbered 0, 1, 2, ..."""
    numbers = []
    for p in images:
        name = os.path.basename(p)
        stem = name[:-len(file_ending)] if file_ending and name.endswith(file_ending) else name
        if len(stem) < 5 or stem[-5] != "_" or not stem[-4:].isdigit():
            return None  # not named by channel (an explicit file list in dataset.json)
        numbers.append(int(stem[-4:]))
    if numbers == list(range(len(numbers))):
        return None
    return (f"channel files are numbered {', '.join(f'_{n:04d}' for n in numbers)}; nnU-Net reads them in name "
            f"order as channels {', '.join(str(i) for i in range(len(numbers)))}")


def check_channel_count(case: str, images: Sequence[str], channels: int, dataset_json: dict[str, Any] | None,
                        per_file: Sequence[int] | None = None) -> None:
    """The channels the reader returns against dataset.json's channel_names. Counted as nnU-Net's reader counts
    them: one RGB file is three channels, a 4D file as many as its first axis. On a mismatch with one channel per
    file, the message names the channel files missing or extra."""
    if not dataset_json:
        return
    expected = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not expected or channels == expected:
        return
    detail = ""
    ending = dataset_json.get("file_ending", "")
    one_each = per_file is None or all(n == 1 for n in per_file)
    if one_each and "dataset" not in dataset_json:
        want = {f"{case}_{i:04d}{ending}" for i in range(expected)}
        have = {os.path.basename(p) for p in images}
        missing, extra = sorted(want - have), sorted(have - want)
        detail = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                       f"unexpected {', '.join(extra)}" if extra else "") if x)
    files = f"{len(images)} file(s)"
    if per_file is not None:
        files += " (" + ", ".join(f"{os.path.basename(p)}: {n}" for p, n in zip(images, per_file)) + ")"
    folder = os.path.dirname(images[0]) if images else ""
    raise CaseError(case, f"{channels} image channel(s) in {files} but dataset.json declares {expected}"
                          + (f": {detail}" if detail else ""), folder or None,
                    "each channel is one file <case>_0000, <case>_0001, ..., or one RGB(A) image holding R, G, B(, A)")


def before_read(case: str, images: Sequence[str], label: str | None,
                dataset_json: dict[str, Any] | None = None) -> None:
    """Cheap checks on the files themselves, before a reader gets them."""
    if not images:
        raise CaseError(case, "no image files found (expected <case>_0000<file_ending> in imagesTr)")
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


def check_images(case: str, images: Sequence[str], data: np.ndarray) -> None:
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
            hint = None
            if seg.shape[0] > 1:
                hint = (f"the reader returned {seg.shape[0]} values per pixel for this label: it is a colour or "
                        "palette image, whose colours nnU-Net reads instead of its class indices; save the label "
                        "as a grey image holding the class numbers")
            raise CaseError(case, f"label values {values} are not declared in dataset.json "
                                  f"(declared: {list(allowed)})", label, hint)


def label_channels(case: str, label: str, channels: int) -> str:
    """A label the reader returns with several values per pixel: nnU-Net preprocesses it without a word."""
    return (f"case {case} ({label}): the reader returns {channels} values per pixel for this label (a colour or "
            f"palette image); nnU-Net keeps all {channels} as channels of its preprocessed segmentation, where "
            "training expects one: save the label as a grey image holding the class numbers")


def geometry_warnings(case: str, image: str, label: str, image_props: dict[str, Any],
                      seg_props: dict[str, Any]) -> list[CaseWarning]:
    """Origin, direction or affine of image and label that differ beyond `np.allclose`: nnU-Net's integrity check
    prints a warning for these and goes on, so the label may not lie where the image is."""
    out = []
    for key, fields in (("sitk_stuff", ("origin", "direction")), ("nibabel_stuff", ("original_affine",))):
        a, b = image_props.get(key), seg_props.get(key)
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        for name in fields:
            x, y = a.get(name), b.get(name)
            if x is None or y is None:
                continue
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            if x.shape != y.shape or not np.allclose(x, y):
                what = name.replace("original_", "")
                out.append(CaseWarning("geometry", label, f"case {case} ({label}): label {what} "
                                       f"{np.round(y, 4).tolist()} differs from image {what} "
                                       f"{np.round(x, 4).tolist()} ({os.path.basename(image)}); nnU-Net goes on "
                                       "with voxel indices, so check that they overlap (nnUNetv2_plot_overlay_pngs)"))
    return out


NIFTI_ENDINGS = (".nii", ".nii.gz")
ITK_READERS = ("SimpleITKIO", "SimpleITKIOWithReorient")


def hidden_non_finite(case: str, path: str, role: str, reader: str) -> Optional[CaseWarning]:
    """NaN and infinities in a float NIfTI file that SimpleITK's reader (and so nnU-Net) reads as 0.

    The file's own values are read with nibabel; only files whose header says floating point can hold them, so
    integer images (most CT) cost one header read.
    """
    if reader not in ITK_READERS or not path.endswith(NIFTI_ENDINGS):
        return None
    try:
        import nibabel

        img: Any = nibabel.load(path)
        if img.get_data_dtype().kind not in "fc":
            return None
        data = np.asanyarray(img.dataobj)
    except Exception:  # the reader already read it; a file nibabel cannot read is not ours to judge here
        return None
    counts = [(int(np.isnan(data).sum()), "NaN"), (int(np.isposinf(data).sum()), "+inf"),
              (int(np.isneginf(data).sum()), "-inf")]
    found = [f"{n} {what}" for n, what in counts if n]
    if not found:
        return None
    return CaseWarning("non_finite_in_file", path, f"case {case} ({path}): {role} file holds {' and '.join(found)} "
                       f"voxel(s) of {data.size}; nnU-Net's reader ({reader}) reads them as 0")


def missing_tiff_spacing(case: str, image: str, label: str) -> list[CaseWarning]:
    """Tiff3DIO reads a case's spacing from `<case>.json` beside its images (and its label's beside the label);
    without it, it assumes (1, 1, 1) and says so only on its console."""
    out = []
    for path, cut in ((image, 5), (label, 0)):
        ending = "." + path.split(".")[-1]
        aux = path[:-(len(ending) + cut)] + ".json"
        if not os.path.isfile(aux):
            out.append(CaseWarning("assumed_spacing", path, f"case {case} ({path}): no spacing file {aux}; "
                                   "nnU-Net's Tiff3DIO assumes spacing (1, 1, 1)"))
    return out


def validating_reader(reader_cls: type, case: str, images: Sequence[str], label: str,
                      dataset_json: dict[str, Any] | None, observed: Optional[dict[str, Any]] = None,
                      capture: Optional[Capture] = None) -> type:
    """A subclass of nnU-Net's reader/writer class that checks what it reads (see the module docstring).

    `observed`, if given, receives what the reader returned: `shape` (c, x, y, z) and `spacing` of the images, and
    `warnings` (CaseWarning) for what nnU-Net accepts but alters or ignores. `capture`, if given, receives copies of
    the images and segmentation as read (io/readcache.py).
    """
    allowed = declared_labels(dataset_json) or None if dataset_json is not None else None
    state: dict[str, Any] = observed if observed is not None else {}
    state.setdefault("warnings", [])

    class ValidatingReader(reader_cls):
        def read_images(self, image_fnames: Any, *args: Any, **kwargs: Any) -> Any:
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
            try:
                check_channel_count(case, image_fnames, data.shape[0], dataset_json)
            except CaseError:
                per_file = [super(ValidatingReader, self).read_images([f])[0].shape[0] for f in image_fnames]
                check_channel_count(case, image_fnames, data.shape[0], dataset_json, per_file)
                raise
            check_images(case, image_fnames, data)
            state["shape"], state["spacing"] = data.shape, props.get("spacing")
            state["image_props"] = props
            if capture is not None:
                capture.took_images(data, props)
            return data, props

        def read_seg(self, seg_fname: Any, *args: Any, **kwargs: Any) -> Any:
            state["in_read_seg"] = True
            try:
                seg, props = super().read_seg(seg_fname, *args, **kwargs)
            except Exception as e:
                raise CaseError(case, f"cannot read label: {_describe(e)}", seg_fname) from None
            finally:
                state["in_read_seg"] = False
            if "shape" in state:
                check_label(case, images, seg_fname, state["shape"][1:], state["spacing"], seg, props.get("spacing"),
                            allowed)
                if not state.get("seg_checked"):
                    state["seg_checked"] = True
                    state["warnings"] += geometry_warnings(case, images[0], seg_fname, state["image_props"], props)
                    if seg.shape[0] > 1:  # readers return (c, x, y, z)
                        state["warnings"].append(CaseWarning("label_channels", seg_fname,
                                                             label_channels(case, seg_fname, seg.shape[0])))
                    if seg.size and not np.any(seg > 0):
                        state["warnings"].append(CaseWarning(
                            "background_only", seg_fname, f"case {case} ({seg_fname}): label has only background; "
                            "nnU-Net accepts this (a case without foreground), make sure it is intended"))
            if capture is not None:
                capture.took_seg(seg)
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
