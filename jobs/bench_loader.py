"""Benchmark: samples/s the training reader delivers, input shards alone and joined with a
teacher cache, with 0, 1, 2 ... DataLoader workers.

    python jobs/bench_loader.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_loader.py size=full workers=[0,1,2] repeats=3 output=runs/bench_loader_full

Keys are ``distsr.bench.loader.BenchLoaderConfig`` fields (``size`` tiny|full sets the
crop and the cached latent shapes of that teacher; ``modes`` input|joined; ``batches`` per
setting; ``repeats`` interleaved rounds). Shards and cache are made once under ``OUTPUT`` and
reused. Writes ``OUTPUT/bench_loader.md`` (the table) and ``OUTPUT/bench_loader.json``.
"""

from __future__ import annotations

import logging

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.loader import BenchLoaderConfig, bench_loader


def show(_cfg: BenchLoaderConfig, result: dict) -> None:
    kib = [(result[k] or 0) / 1024 for k in ("input_bytes_per_sample", "cache_bytes_per_sample")]
    print(f"{result['machine']}, {result['date']}: {result['samples']} samples in "
          f"{result['shards']} shards, {kib[0]:.0f} KiB input + {kib[1]:.0f} KiB cache per "
          "sample")  # fmt: skip
    print(result["table"])


JOB = BenchJob(__doc__, keys_of(BenchLoaderConfig), bench_loader, show, logging.WARNING)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
