"""Benchmark: FKdiff's FASRer_S distilled with PHexKD vs trained alone vs bicubic (CPU).

    python jobs/bench_fkdiff.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_fkdiff.py output=runs/bench_fkdiff  # 800 + 300 + 500 steps (defaults)

Keys are ``distsr.evaluate.bench_fkdiff.BenchFKdiffConfig`` fields. Trains the teacher (stage 1:
restorer + CFE_D; stage 2: the T = 4 prior diffusion), caches its sampled Z_hat, then FASRer_S
with PHexKD (+ FASRer_L and the FDD blocks) and FASRer_S alone with the same steps and data
(bicubic x4 crops of the bundled photos), and scores them on held-out photos (PSNR / SSIM on Y).
Writes ``OUTPUT/bench_fkdiff.md`` (the table) and ``OUTPUT/bench_fkdiff.json``; a re-run skips
what is done.
"""

from __future__ import annotations

import logging
import sys

from distsr.config import load_job_config
from distsr.evaluate.bench_fkdiff import BenchFKdiffConfig, bench_fkdiff


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    summary = bench_fkdiff(load_job_config(BenchFKdiffConfig, argv))
    print(summary["table"] + "".join(f"* {n}\n" for n in summary["notes"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
