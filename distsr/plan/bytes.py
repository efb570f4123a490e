"""Bytes per sample of the input shards and of the teacher cache, as the project writes them
(``data.shards.encode_sample`` / ``data.cache.TeacherCache.encode``), measured by writing one
sample with ``webdataset.TarWriter`` as ``data.shards.AtomicTarWriter`` opens it (tarfile's PAX
format: per member a 512 B header, a 1 KiB PAX header for the float mtime, the data padded to
512 B). A shard ends with two zero blocks padded to tarfile's 10240 B record (at most 11264 B
per shard, not in the per-sample figures).

Cache fields are exact (float16 / int64 ``.npy``: header + data). The PNGs of a shard depend on
the image: the figure is that of incompressible content (uniform noise encoded by the project's
``png_bytes``), an upper bound; photos compress to roughly half of it. ``meta.json`` (the
degradation record, about 100-200 B) is planned as 202 B.
"""

from __future__ import annotations

import io

import numpy as np
import webdataset as wds

KEY = "image_0000000000"  # a key of typical length (names over 100 characters cost more)


def sample_bytes(members: dict[str, bytes]) -> int:
    """Tar bytes of one sample, written as ``AtomicTarWriter`` writes it."""
    writer = wds.TarWriter(io.BytesIO(), encoder=False, mtime=0.0)
    writer.write({"__key__": KEY, **members})
    return writer.tarstream.offset


def png_bound(height: int, width: int) -> bytes:
    """PNG of an RGB uint8 image of seeded uniform noise (incompressible)."""
    from distsr.data.shards import png_bytes

    img = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return png_bytes(img)


def shard_sample_bytes(gt: int, scale: int) -> dict:
    """Tar bytes of one input-shard sample {gt.png, lq.png, meta.json}."""
    members = {
        "gt.png": png_bound(gt, gt),
        "lq.png": png_bound(gt // scale, gt // scale),
        "meta.json": b"{" + b" " * 200 + b"}",
    }
    sizes = {name: len(data) for name, data in members.items()}
    return {"members": sizes, "bytes": sample_bytes(members)}


def cache_sample_bytes(fields: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    """Tar bytes of one cache sample: one ``<name>.npy`` per field (shape, dtype)."""
    from distsr.data.cache import _npy_bytes

    members = {
        f"{name}.npy": _npy_bytes(np.zeros(shape, dtype), dtype)
        for name, (shape, dtype) in fields.items()
    }
    sizes = {name: len(data) for name, data in members.items()}
    return {"members": sizes, "bytes": sample_bytes(members)}
