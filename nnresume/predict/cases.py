"""The input folder's cases as nnUNetv2_predict groups them, and their input digests.

nnU-Net (`create_lists_from_splitted_dataset_folder`) takes every file ending in the model's file ending, cuts the
last five characters before the ending (`_XXXX`) to get the case identifier, and gives each identifier the files named
`<identifier>_<four digits><ending>`, sorted by name. Re-expressed here in one pass over the folder, so that the
orchestrator never imports nnunetv2.

A file whose size and modification time match what the ledger recorded keeps its recorded digest; any other is hashed
again (in threads: hashing releases the GIL), so a `touch` costs one hash and redoes nothing.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..io import atomic
from ..ledger.repository import CaseRecord
from ..tasks import InputFileInfo

HASH_THREADS = 4


def list_input_cases(folder: Path, file_ending: str) -> dict[str, tuple[str, ...]]:
    """Case identifier -> its channel files, in nnU-Net's order (identifiers sorted, files sorted by name)."""
    crop = len(file_ending) + 5
    channel_suffix = re.compile(r"_\d\d\d\d" + re.escape(file_ending))
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.name.endswith(file_ending) and e.is_file())
    grouped: dict[str, list[str]] = {}
    for name in names:
        identifier = name[:-crop]
        files = grouped.setdefault(identifier, [])
        if channel_suffix.fullmatch(name[len(identifier):]):
            files.append(str(folder / name))
    return {k: tuple(grouped[k]) for k in sorted(grouped)}


def input_digest(files: list[InputFileInfo]) -> str:
    """A case's input digest: its files' digests in channel order (the formula the preprocessing stages use)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.role != "image", f.channel)):
        h.update(f"{f.role}:{f.channel}:{f.digest}\n".encode())
    return h.hexdigest()


def _channel(path: str, file_ending: str) -> int:
    return int(os.path.basename(path)[-(len(file_ending) + 4):-len(file_ending)])


def hash_inputs(cases: dict[str, tuple[str, ...]], records: dict[str, CaseRecord], file_ending: str
                ) -> tuple[dict[str, tuple[str, list[InputFileInfo]]], dict[str, str]]:
    """(case -> (input digest, files)) for the cases whose files could be read, and (case -> message) for the
    others."""
    known = {f.path: f for rec in records.values() for f in rec.files}
    failed: dict[str, str] = {}
    todo: list[tuple[str, str, os.stat_result]] = []
    infos: dict[str, InputFileInfo] = {}
    for case, paths in cases.items():
        for path in paths:
            try:
                st = os.stat(path)
            except OSError as e:
                failed.setdefault(case, f"case {case} ({path}): cannot read file: {e.strerror}")
                continue
            k = known.get(path)
            if k is not None and (k.size, k.mtime_ns) == (st.st_size, st.st_mtime_ns):
                infos[path] = InputFileInfo("image", _channel(path, file_ending), path, st.st_size, st.st_mtime_ns,
                                            k.digest)
            else:
                todo.append((case, path, st))

    def digest(item: tuple[str, str, os.stat_result]) -> tuple[str, str, os.stat_result, str | None, str]:
        case, path, st = item
        try:
            return case, path, st, atomic.file_digest(path), ""
        except OSError as e:
            return case, path, st, None, str(e.strerror)

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as ex:
        for case, path, st, sha, error in ex.map(digest, todo):
            if sha is None:
                failed.setdefault(case, f"case {case} ({path}): cannot read file: {error}")
            else:
                infos[path] = InputFileInfo("image", _channel(path, file_ending), path, st.st_size, st.st_mtime_ns,
                                            sha)
    out = {}
    for case, paths in cases.items():
        if case in failed:
            continue
        files = [infos[p] for p in paths]
        out[case] = (input_digest(files), files)
    return out, failed
