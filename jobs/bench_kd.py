"""Benchmark: one small student distilled four ways from pretrained ncnn teachers (CPU).

    python jobs/bench_kd.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_kd.py steps=4000 aggregator_steps=1500 output=runs/bench_kd

Keys are ``distsr.bench.kd.BenchKDConfig`` fields. Trains (a) L1 only, (b) vanilla
output KD, (c) MTKD and (d) the DTKD loss with the same student, steps and data (bicubic x4 crops
of the bundled photos), then scores bicubic, each teacher and each student on held-out photos.
Writes ``OUTPUT/bench_kd.md`` (the table) and ``OUTPUT/bench_kd.json``; a re-run skips what is
done. NIQE's parameter file is made from BasicSR's installed copy (the ``metrics`` extra).
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.kd import BenchKDConfig, bench_kd


def show(_cfg: BenchKDConfig, summary: dict) -> None:
    print(summary["table"] + "".join(f"* {n}\n" for n in summary["notes"]))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings"].items()))


JOB = BenchJob(__doc__, keys_of(BenchKDConfig), bench_kd, show)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
