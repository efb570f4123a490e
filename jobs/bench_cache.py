"""Benchmark: TAD-SR student training steps per second with the teacher cache vs the live teacher.

    python jobs/bench_cache.py [size=tiny|full] [steps=30] [crop_size=32] [repeats=3] \
        [out=runs/bench_cache] [key=value ...]

One run, same config, same machine: makes shards from the bundled photos, a random-weight ResShift
teacher — ``size=tiny``: the 4-step tiny teacher of ``tadsr_tiny``; ``size=full``: the released
real-SR x4 size of ``tadsr_resshift`` (118.6 M-parameter UNet, VQ-f4, 15 steps, one random 256^2
crop per photo, batch 1) — caches its trajectories (Ray actors), then trains the TAD-SR student
in-process for ``steps`` steps twice — from the cache and with the live teacher, each in a new run
folder (``out/runs/{cached,live}`` are replaced; shards and cache are reused) — and reports the
ratio of steps per second next to the FLOP bound (torch's flop counter on one training step,
forward + backward, with each source). The two arms alternate ``repeats`` times; the report gives
the median and the range (min, max) of each arm's steps/s and of the per-repeat ratio, since one
run on a shared machine says little. Extra ``key=value`` pairs override the TAD-SR config.
The logic lives in ``distsr.bench.cache``; this file adds the Ray caching.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling jobs

import cache_teacher  # noqa: E402

from distsr.bench.cache import bench_cache, parse  # noqa: E402
from distsr.bench.cli import BenchJob  # noqa: E402
from distsr.config import CONFIG_DIR  # noqa: E402


def cache_with_ray(config: str, teacher: list[str], shards: Path, output: Path) -> Path:
    """The teacher cache job (``jobs/cache_teacher.py``: two Ray actors, CPU)."""
    summary = cache_teacher.main([str(CONFIG_DIR / f"{config}.yaml"),
                                  *(f"teacher.{o}" for o in teacher), f"shards=[{shards}]",
                                  f"output={output}", "num_actors=2", "use_gpu=false",
                                  "cpus_per_actor=1", "batch_size=2"])  # fmt: skip
    return Path(summary["cache_dir"])


def show(_parsed: tuple, result: dict) -> None:
    print(json.dumps(result, indent=1))


JOB = BenchJob(__doc__, parse, lambda parsed: bench_cache(*parsed, cache_with_ray), show,
               log_level=None)  # fmt: skip
main = JOB.main

if __name__ == "__main__":
    JOB.run()
