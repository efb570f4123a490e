"""Benchmark: FKdiff's FASRer_S distilled with PHexKD vs trained alone vs bicubic (CPU).

    python jobs/bench_fkdiff.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_fkdiff.py output=runs/bench_fkdiff  # 800 + 300 + 500 steps (defaults)

Keys are ``distsr.bench.fkdiff.BenchFKdiffConfig`` fields. Trains the teacher (stage 1:
restorer + CFE_D; stage 2: the T = 4 prior diffusion), caches its sampled Z_hat, then FASRer_S
with PHexKD (+ FASRer_L and the FDD blocks) and FASRer_S alone with the same steps and data
(bicubic x4 crops of the bundled photos), and scores them on held-out photos (PSNR / SSIM on Y).
Writes ``OUTPUT/bench_fkdiff.md`` (the table) and ``OUTPUT/bench_fkdiff.json``; a re-run skips
what is done.
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.fkdiff import BenchFKdiffConfig, bench_fkdiff


def show(_cfg: BenchFKdiffConfig, summary: dict) -> None:
    print(summary["table"] + "".join(f"* {n}\n" for n in summary["notes"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()))


JOB = BenchJob(__doc__, keys_of(BenchFKdiffConfig), bench_fkdiff, show)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
