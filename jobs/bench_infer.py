"""Benchmark: seconds per image of the one-step student vs the multi-step ResShift teacher.

    python jobs/bench_infer.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_infer.py size=full lq_size=64 repeats=3 output=runs/bench_infer_full
    python jobs/bench_infer.py size=full device=cuda

Keys are ``distsr.evaluate.bench_infer.BenchInferConfig`` fields (``size`` tiny|full, ``arms``
from student, teacher, student_tiled, teacher_tiled, ``tile``/``overlap`` in lq pixels,
``repeats`` interleaved rounds, ``device``). Random weights. Writes ``OUTPUT/bench_infer.md``
(the table) and ``OUTPUT/bench_infer.json`` (every timing).
"""

from __future__ import annotations

import sys

from distsr.config import load_job_config
from distsr.evaluate.bench_infer import BenchInferConfig, bench_infer


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    result = bench_infer(load_job_config(BenchInferConfig, argv))
    print(f"{result['machine']}, {result['date']}: UNet {result['unet_params'] / 1e6:.1f} M, "
          f"{result['teacher_steps']} steps, lq {result['lq']} -> sr {result['sr']}")  # fmt: skip
    print(result["table"])
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
