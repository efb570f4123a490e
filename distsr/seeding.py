"""One seeding rule for every process: ``stable_seed(*parts)`` hashes ints and strings into a
63-bit seed that is the same in every process and Python run (``hash()`` is salted per process).

Used for the degradation of each shard sample, the shuffle and crop streams of the reader, each
sample's teacher noise (``teachers.noise``) and the lq of evaluation images. ``seeded_noise`` is
the prior eps of the one-step predictors (PyTorch and ONNX alike).
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints/strings, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal ``shape`` from a fresh CPU generator seeded with ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
