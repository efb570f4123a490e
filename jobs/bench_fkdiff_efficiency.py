"""FKdiff efficiency table in the style of the paper's Table 2 (paper 000).

    python jobs/bench_fkdiff_efficiency.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_fkdiff_efficiency.py size=64 mac_size=256 repeats=3 device=cpu

Keys are ``distsr.evaluate.efficiency.EfficiencyConfig`` fields. Prints the parameter count of
every FKdiff part in the paper configurations, and for the teacher (DiffIR-S2 layout), FKdiff-L
and FKdiff-S pipelines (CFE_R + T-step prior sampling + restorer, random weights): MACs at lq
``mac_size`` (counted on the meta device), runtime and peak memory at lq ``size`` on ``device``.
"""

from __future__ import annotations

from distsr.bench.cli import BenchJob, keys_of
from distsr.bench.fkdiff_efficiency import EfficiencyConfig, bench_fkdiff_efficiency, report


def show(cfg: EfficiencyConfig, rows: list[dict]) -> None:
    print(report(cfg, rows))


JOB = BenchJob(__doc__, keys_of(EfficiencyConfig), bench_fkdiff_efficiency, show, log_level=None)
main = JOB.main

if __name__ == "__main__":
    JOB.run()
