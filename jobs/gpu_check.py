"""The GPU check: one command whose numbers go into BENCHMARKS.md (see ``distsr.bench.gpu_check``).

    python jobs/gpu_check.py [out=runs/gpu_check] [batch_size=8] [steps=10] [repeats=3]
    python jobs/gpu_check.py size=tiny            # the same code at tiny size on the CPU

Writes ``out/gpu_check.json`` and ``out/gpu_check.md``: released-size ResShift UNet and SeeSR
UNet + ControlNet training steps in bf16 (samples/s, peak memory, MFU), the cached / live TAD-SR
step ratio, and the ResShift-15 teacher's and one-step student's seconds per 64 -> 256 image.
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob
from distsr.bench.gpu_check import gpu_check, parse


def show(_opts: dict, result: dict) -> None:
    print(result.get("table") or "")


JOB = BenchJob(__doc__, parse, gpu_check, show)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
