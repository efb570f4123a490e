"""One seeding rule for every process: ``stable_seed(*parts)`` hashes ints and strings into a
63-bit seed that is the same in every process and Python run (``hash()`` is salted per process).

Used for the degradation of each shard sample, the shuffle and crop streams of the reader, each
sample's teacher noise (``teachers.noise``) and the lq of evaluation images.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints/strings, the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
