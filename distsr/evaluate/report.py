"""Evaluation outputs: ``report.md`` (Markdown tables), ``metrics.json`` and image grids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list], digits: dict[int, int] | None = None) -> list[str]:
    """Markdown table; ``digits[column]`` overrides the 4 decimals of float cells."""
    digits = digits or {}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_fmt(v, digits.get(i, 4)) for i, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric_header(result: dict) -> list[str]:
    arrows = {True: " ↓", False: " ↑"}
    return [m["name"] + arrows[m["lower_better"]] for m in result["metrics"]]


def markdown(result: dict) -> str:
    """The whole report: setup lines, mean table with efficiency columns, per-image table."""
    names = [m["name"] for m in result["metrics"]]
    mem_kind = result["memory_kind"]
    lines = ["# distsr evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in result["info"].items()]
    lines += [f"- {msg}" for msg in result["skipped_metrics"].values()]
    lines += [f"- skipped image {p}: {e}" for p, e in result.get("skipped_images", {}).items()]
    lines += ["", f"## Mean over {len(result['images'])} image(s)", ""]
    header = ["predictor", "steps", "params (M)", "s / image", f"peak memory MiB ({mem_kind})"]
    rows = []
    for name, p in result["predictors"].items():
        params = None if p["params"] is None else p["params"] / 1e6
        eff = [p["steps"], params, p["seconds_per_image"], p["peak_memory_mib"]]
        rows.append([name, *eff, *(p["mean"].get(n) for n in names)])
    lines += _table(header + _metric_header(result), rows, {2: 3, 4: 1})
    lines += ["", "## Per image", ""]
    rows = [
        [image, name, *(scores.get(n) for n in names)]
        for image, per_predictor in result["images"].items()
        for name, scores in per_predictor.items()
    ]
    lines += _table(["image", "predictor", *_metric_header(result)], rows)
    return "\n".join(lines) + "\n"


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def write_report(result: dict, out_dir: Path) -> None:
    """``report.md`` and ``metrics.json`` (strict JSON: NaN as null) in ``out_dir``, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("metrics.json", json.dumps(_nan_to_none(result), indent=2, allow_nan=False)),
        ("report.md", markdown(result)),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


# ---------------------------------------------------------------- grids


def zoom_box(ref: np.ndarray, frac: int = 4) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the most detailed of 7x7 candidate crops of ``ref`` of
    1/``frac`` of its size (largest standard deviation of grey levels)."""
    h, w = ref.shape[:2]
    ch, cw = max(1, h // frac), max(1, w // frac)
    grey = ref.astype(np.float32).mean(axis=2)
    best, box = -1.0, (0, 0, ch, cw)
    for top in np.linspace(0, h - ch, 7).astype(int):
        for left in np.linspace(0, w - cw, 7).astype(int):
            score = float(grey[top : top + ch, left : left + cw].std())
            if score > best:
                best, box = score, (int(top), int(left), ch, cw)
    return box


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.NEAREST))


def _labelled(img: np.ndarray, label: str) -> np.ndarray:
    strip = Image.new("RGB", (img.shape[1], LABEL_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), label, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), img], axis=0)


def make_grid(columns: list[tuple[str, np.ndarray]], gap: int = 2) -> np.ndarray:
    """Top row: every column's image at the sr size (lq enlarged by nearest neighbour), with
    its label; bottom row: the same crop of each, zoomed to the column width. The crop is the
    most detailed region of the last column (gt when given)."""
    h, w = max(c[1].shape[0] for c in columns), max(c[1].shape[1] for c in columns)
    full = [_resize(img, h, w) if img.shape[:2] != (h, w) else img for _, img in columns]
    top, left, ch, cw = zoom_box(full[-1])
    zh = max(1, round(ch * w / cw))
    crops = [_resize(img[top : top + ch, left : left + cw], zh, w) for img in full]
    cells = [
        np.concatenate([_labelled(img, label), np.full((gap, w, 3), 255, np.uint8), crop])
        for (label, _), img, crop in zip(columns, full, crops)
    ]
    sep = np.full((cells[0].shape[0], gap, 3), 255, np.uint8)
    row = [part for cell in cells for part in (cell, sep)][:-1]
    return np.concatenate(row, axis=1)
