"""FKdiff efficiency table in the style of the paper's Table 2 (paper 000).

    python jobs/bench_fkdiff_efficiency.py [CONFIG.yaml] [key=value ...]
    python jobs/bench_fkdiff_efficiency.py size=64 mac_size=256 repeats=3 device=cpu

Keys are ``distsr.evaluate.efficiency.EfficiencyConfig`` fields. Prints the parameter count of
every FKdiff part in the paper configurations, and for the teacher (DiffIR-S2 layout), FKdiff-L
and FKdiff-S pipelines (CFE_R + T-step prior sampling + restorer, random weights): MACs at lq
``mac_size`` (counted on the meta device), runtime and peak memory at lq ``size`` on ``device``.
"""

from __future__ import annotations

import sys

from distsr.config import load_job_config
from distsr.evaluate.efficiency import (
    PAPER_TABLE2,
    EfficiencyConfig,
    fasrer_width_for,
    fkdiff_param_counts,
    fkdiff_table,
    markdown,
)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return []
    cfg = load_job_config(EfficiencyConfig, argv)
    rows = fkdiff_table(cfg)
    print(markdown(rows, cfg, fkdiff_param_counts()))
    paper = PAPER_TABLE2["FKdiff"][0]
    print(f"FASRer_S width whose FKdiff-S pipeline is closest to the paper's {paper}M: "
          f"{fasrer_width_for(paper * 1e6)} (presets use 64)")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
