"""Benchmark: training and inference steps per second with and without ``engine.compile`` and
``engine.channels_last``, side by side in one run (CPU here, a GPU where there is one).

    python jobs/bench_compile.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_compile.py config=resshift_tiny steps=20 repeats=3 output=runs/bench_compile

Keys are ``distsr.bench.compile.BenchCompileConfig`` fields (``config``: the run config
whose student is timed; ``overrides``: its key=value changes, e.g. ``overrides=[data.batch_size=16,
engine.precision=bf16]``). Prints the table (median and range over the interleaved repeats) and
writes ``OUTPUT/bench_compile.md`` and ``OUTPUT/bench_compile.json``.
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.compile import BenchCompileConfig, bench_compile


def show(_cfg: BenchCompileConfig, summary: dict) -> None:
    student = summary["student"]
    print(f"{summary['machine']}; student {student['engine']} of {student['recipe']} "
          f"({student['parameters'] / 1e6:.3f} M parameters), batch {student['batch_size']}, "
          f"{student['precision']}")  # fmt: skip
    print(summary["table"])


JOB = BenchJob(__doc__, keys_of(BenchCompileConfig), bench_compile, show)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
