"""Benchmark: the teacher-caching job's samples/s against the bare teacher sampler's.

    python jobs/bench_cache_job.py [size=tiny|full] [repeats=3] [batch_size=4] [threads=2] \
        [ray=false] [crop_size=N] [random_crops=N] [out=runs/bench_cache_job]

One run, same device, batch size and threads: shards from the bundled photos and a random-weight
ResShift teacher (``size=tiny``: the tiny 4-step teacher; ``size=full``: the released real-SR x4
size, 15 steps, VQ-f4), then, alternated ``repeats`` times, the caching job in process, the job
through Ray with one actor (``ray=true``), and the bare sampler on the same batches in memory.
Writes ``out/result.json`` and ``out/result.md``. The logic lives in ``distsr.bench.cache_job``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling jobs

import cache_teacher  # noqa: E402

from distsr.bench.cache_job import bench_cache_job, parse  # noqa: E402
from distsr.bench.cli import BenchJob  # noqa: E402


def ray_job(cfg) -> dict:
    """The job through Ray (one actor: ``num_actors=1`` in the bench's job config)."""
    return cache_teacher.run(cfg, progress=False)


def bench(opts: dict) -> dict:
    return bench_cache_job(opts, ray_job if opts["ray"] else None)


def show(_opts: dict, result: dict) -> None:
    print(json.dumps(result, indent=1))


JOB = BenchJob(__doc__, parse, bench, show, log_level=None)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
