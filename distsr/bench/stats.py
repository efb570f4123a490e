"""How every benchmark reports repeated measurements: the median and the range (min, max), since
one run on a shared machine says little."""

from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict:
    """``{"median", "min", "max"}`` of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_text(values: list[float], digits: int = 2) -> str:
    """``median (min–max)`` for a table cell."""
    s = spread(values)
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
