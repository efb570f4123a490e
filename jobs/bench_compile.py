"""Benchmark: training and inference steps per second with and without ``engine.compile`` and
``engine.channels_last``, side by side in one run (CPU here, a GPU where there is one).

    python jobs/bench_compile.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_compile.py config=resshift_tiny steps=20 repeats=3 output=runs/bench_compile

Keys are ``distsr.engine.bench_compile.BenchCompileConfig`` fields (``config``: the run config
whose student is timed; ``overrides``: its key=value changes, e.g. ``overrides=[data.batch_size=16,
engine.precision=bf16]``). Prints the table (median and range over the interleaved repeats) and
writes ``OUTPUT/bench_compile.md`` and ``OUTPUT/bench_compile.json``.
"""

from __future__ import annotations

import logging
import sys

from distsr.config import load_job_config
from distsr.engine.bench_compile import BenchCompileConfig, bench_compile


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    summary = bench_compile(load_job_config(BenchCompileConfig, argv))
    student = summary["student"]
    print(f"{summary['machine']}; student {student['engine']} of {student['recipe']} "
          f"({student['parameters'] / 1e6:.3f} M parameters), batch {student['batch_size']}, "
          f"{student['precision']}")  # fmt: skip
    print(summary["table"])
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
