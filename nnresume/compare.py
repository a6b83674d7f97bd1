"""Compares two nnU-Net preprocessed dataset folders: what `nnUNetv2_train` would read from each.

Used by the identity tests, the benchmarks and the kill campaign. Compressed bytes may differ (blosc2 chooses filters
by trial); what must be equal is the decompressed arrays (dtype, shape, values), the properties pickles (numpy-aware),
the JSON files, and the gt_segmentations files byte for byte.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

JSON_FILES = ("dataset_fingerprint.json", "dataset.json")
IGNORED = {".nnresume", "nnresume.sqlite", "nnresume.sqlite-wal", "nnresume.sqlite-shm"}


def same_value(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between two nested values; numpy arrays compared by dtype, shape and exact values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"]
        return [] if np.array_equal(a, b, equal_nan=a.dtype.kind in "fc") else [f"{path}: array values differ"]
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in same_value(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_value(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and np.isnan(a) and np.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _b2nd(path: Path) -> np.ndarray:
    import blosc2

    return blosc2.open(str(path), mode="r")[:]


def compare_folders(ours: Path, reference: Path, data_folders: list[str] | None = None,
                    plans_files: list[str] | None = None) -> list[str]:
    """All differences between two preprocessed dataset folders (empty list: identical for training)."""
    ours, reference = Path(ours), Path(reference)
    diffs: list[str] = []
    for name in list(JSON_FILES) + list(plans_files or []):
        a, b = ours / name, reference / name
        if not a.is_file() or not b.is_file():
            diffs.append(f"{name}: present {a.is_file()} vs {b.is_file()}")
            continue
        diffs += [f"{name}{d}" for d in same_value(json.loads(a.read_text()), json.loads(b.read_text()))]
    if data_folders is None:
        data_folders = sorted(p.name for p in reference.iterdir() if p.is_dir() and p.name not in IGNORED)
    for folder in data_folders:
        fa, fb = ours / folder, reference / folder
        names_a = sorted(p.name for p in fa.iterdir()) if fa.is_dir() else []
        names_b = sorted(p.name for p in fb.iterdir()) if fb.is_dir() else []
        if names_a != names_b:
            diffs.append(f"{folder}: files {sorted(set(names_a) ^ set(names_b))} present in one folder only")
        for name in sorted(set(names_a) & set(names_b)):
            a, b = fa / name, fb / name
            where = f"{folder}/{name}"
            if name.endswith(".b2nd"):
                diffs += [f"{where}{d}" for d in same_value(_b2nd(a), _b2nd(b))]
            elif name.endswith(".pkl"):
                with open(a, "rb") as f1, open(b, "rb") as f2:
                    diffs += [f"{where}{d}" for d in same_value(pickle.load(f1), pickle.load(f2))]
            elif a.read_bytes() != b.read_bytes():
                diffs.append(f"{where}: bytes differ")
    return diffs
