"""Exact, compact storage for Python objects that hold large numpy arrays (each case's fingerprint result).

nnU-Net keeps 10e7 / number-of-cases foreground samples per case and channel, so the per-case results of any dataset
add up to about 400 MB per channel as float32. They are kept between runs so that only changed cases are analysed
again. Stored as a pickle (protocol 5) whose array buffers are compressed separately with LZ4 and byte shuffle:
lossless, about 3.5x smaller for CT-like data, and quick to read back (aggregation reads them all while every other
worker waits: LZ4 decompresses 2.5x faster than zstd here, for files 40% larger).
"""
from __future__ import annotations

import pickle
from typing import Any

MAGIC = b"nnresume-blob-2\n"
_CHUNK = 1 << 30  # blosc2 compresses at most ~2 GB per call


def dumps(obj: Any, summary: Any = None) -> bytes:
    """`summary`, a small picklable value, is stored uncompressed up front: `read_summary` gets it without the rest."""
    import blosc2

    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    packed = []
    for b in buffers:
        raw = b.raw()
        packed.append([blosc2.compress2(raw[i:i + _CHUNK], typesize=4, codec=blosc2.Codec.LZ4, clevel=5,
                                        filters=[blosc2.Filter.SHUFFLE], nthreads=1)
                       for i in range(0, len(raw), _CHUNK)] or [b""])
    head = pickle.dumps(summary, protocol=5)
    return MAGIC + len(head).to_bytes(8, "little") + head + pickle.dumps((meta, packed), protocol=5)


def _split(data: bytes) -> tuple[bytes, bytes]:
    if not data.startswith(MAGIC):
        raise ValueError("not an nnresume blob")
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    return data[start:start + n], data[start + n:]


def read_summary(path: str) -> Any:
    """The summary stored by `dumps`, read without reading the rest of the file."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 8)
        if not start.startswith(MAGIC):
            raise ValueError(f"{path} is not an nnresume blob")
        return pickle.loads(f.read(int.from_bytes(start[len(MAGIC):], "little")))


def loads(data: bytes) -> Any:
    import blosc2

    _, body = _split(data)
    meta, packed = pickle.loads(body)
    buffers = [bytearray(b"".join(blosc2.decompress2(c) for c in chunks if c)) for chunks in packed]
    return pickle.loads(meta, buffers=buffers)
