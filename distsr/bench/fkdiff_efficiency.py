"""FKdiff efficiency table in the style of the paper's Table 2 (paper 000): the measures and the
table of ``distsr.evaluate.efficiency`` (``fkdiff_table``, ``markdown``), with every part's
parameter count and the FASRer_S width the paper's FKdiff-S size implies.
``jobs/bench_fkdiff_efficiency.py`` is the command line."""

from __future__ import annotations

from distsr.evaluate.efficiency import (
    PAPER_TABLE2,
    EfficiencyConfig,
    fasrer_width_for,
    fkdiff_param_counts,
    fkdiff_table,
    markdown,
)

__all__ = ["EfficiencyConfig", "bench_fkdiff_efficiency", "report"]


def bench_fkdiff_efficiency(cfg: EfficiencyConfig) -> list[dict]:
    """One row per pipeline (``efficiency.fkdiff_table``)."""
    return fkdiff_table(cfg)


def report(cfg: EfficiencyConfig, rows: list[dict]) -> str:
    """The table, the paper's rows, every part's parameters, and the implied FASRer_S width."""
    paper = PAPER_TABLE2["FKdiff"][0]
    return (f"{markdown(rows, cfg, fkdiff_param_counts())}\n"
            f"FASRer_S width whose FKdiff-S pipeline is closest to the paper's {paper}M: "
            f"{fasrer_width_for(paper * 1e6)} (presets use 64)")  # fmt: skip
