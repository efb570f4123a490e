"""Benchmark: seconds per image of the one-step student vs the multi-step ResShift teacher.

    python jobs/bench_infer.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_infer.py size=full lq_size=64 repeats=3 output=runs/bench_infer_full
    python jobs/bench_infer.py size=full device=cuda

Keys are ``distsr.bench.infer.BenchInferConfig`` fields (``size`` tiny|full, ``arms``
from student, teacher, student_tiled, teacher_tiled, ``tile``/``overlap`` in lq pixels,
``repeats`` interleaved rounds, ``device``). Random weights. Writes ``OUTPUT/bench_infer.md``
(the table) and ``OUTPUT/bench_infer.json`` (every timing).
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.infer import BenchInferConfig, bench_infer


def show(_cfg: BenchInferConfig, result: dict) -> None:
    print(f"{result['machine']}, {result['date']}: UNet {result['unet_params'] / 1e6:.1f} M, "
          f"{result['teacher_steps']} steps, lq {result['lq']} -> sr {result['sr']}")  # fmt: skip
    print(result["table"])


JOB = BenchJob(__doc__, keys_of(BenchInferConfig), bench_infer, show, log_level=None)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
