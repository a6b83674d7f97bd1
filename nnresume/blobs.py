"""Exact, compact storage for Python objects that hold large numpy arrays (each case's fingerprint result).

nnU-Net keeps 10e7 / number-of-cases foreground samples per case and channel, so the per-case results of any dataset
add up to about 400 MB per channel as float32. They are kept between runs so that only changed cases are analysed
again. Stored as a pickle (protocol 5) whose array buffers are compressed separately with zstd and byte shuffle:
lossless, about 5x smaller for CT-like data, ~0.1 s per 50 MB.
"""
from __future__ import annotations

import pickle
from typing import Any

MAGIC = b"nnresume-blob-1\n"
_CHUNK = 1 << 30  # blosc2 compresses at most ~2 GB per call


def dumps(obj: Any) -> bytes:
    import blosc2

    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    packed = []
    for b in buffers:
        raw = b.raw()
        packed.append([blosc2.compress2(raw[i:i + _CHUNK], typesize=4, codec=blosc2.Codec.ZSTD, clevel=1,
                                        filters=[blosc2.Filter.SHUFFLE], nthreads=1)
                       for i in range(0, len(raw), _CHUNK)] or [b""])
    return MAGIC + pickle.dumps((meta, packed), protocol=5)


def loads(data: bytes) -> Any:
    import blosc2

    if not data.startswith(MAGIC):
        raise ValueError("not an nnresume blob")
    meta, packed = pickle.loads(data[len(MAGIC):])
    buffers = [bytearray(b"".join(blosc2.decompress2(c) for c in chunks if c)) for chunks in packed]
    return pickle.loads(meta, buffers=buffers)
