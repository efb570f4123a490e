"""Benchmark: one small student distilled four ways from pretrained ncnn teachers (CPU).

    python jobs/bench_kd.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_kd.py steps=4000 aggregator_steps=1500 output=runs/bench_kd

Keys are ``distsr.evaluate.bench_kd.BenchKDConfig`` fields. Trains (a) L1 only, (b) vanilla
output KD, (c) MTKD and (d) the DTKD loss with the same student, steps and data (bicubic x4 crops
of the bundled photos), then scores bicubic, each teacher and each student on held-out photos.
Writes ``OUTPUT/bench_kd.md`` (the table) and ``OUTPUT/bench_kd.json``; a re-run skips what is
done. NIQE's parameter file is made from BasicSR's installed copy (the ``metrics`` extra).
"""

from __future__ import annotations

import logging
import sys

from distsr.config import load_job_config
from distsr.evaluate.bench_kd import BenchKDConfig, bench_kd


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    summary = bench_kd(load_job_config(BenchKDConfig, argv))
    print(summary["table"] + "".join(f"* {n}\n" for n in summary["notes"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
