"""Tiled super-resolution of large images with overlap blending.

The lq image is cut into ``tile`` x ``tile`` tiles that overlap by at least ``overlap`` pixels
(the last tile of a row/column is moved back to end at the border). Each tile's sr output is
weighted by a ramp that rises over ``overlap * scale`` output pixels on every side that borders
another tile (linear or cosine, always > 0) and is 1 elsewhere; the result is the weighted mean,
accumulated in float64 on the CPU. So one tile covering the image gives its output bit for bit,
and a per-pixel predictor gives the untiled output bit for bit whatever the tiling.

Predictors with a ``draw_noise(lq)`` method (the ResShift ones) get ``noise=`` the crop of one
full-image latent noise map, so overlapping tiles see the same noise. Predictors with a
``tiled(lq, tile, overlap, progress)`` method tile in their own space (SeeSR: latent tiles with
Gaussian blending, ``inference.seesr``) and are handed the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

RAMPS = ("linear", "cosine")


def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of tiles covering ``length`` with stride ``tile - overlap`` (at least
    ``align``); starts are multiples of ``align``; the last tile ends at ``length`` (it is up to
    ``align - 1`` pixels longer than ``tile`` when its start had to be rounded down)."""
    if tile >= length:
        return [(0, length)]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, length - tile, stride))
    last = (length - tile) // align * align
    if not starts or starts[-1] != last:
        starts.append(last)
    return [(s, min(s + tile, length)) for s in starts[:-1]] + [(starts[-1], length)]


def ramp(n: int, width: int, rise: bool, fall: bool, kind: str) -> torch.Tensor:
    """1-D weights of length ``n``: a ramp over ``width`` samples at a rising start/falling end."""
    w = torch.ones(n, dtype=torch.float64)
    width = min(width, n)
    if width <= 0:
        return w
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width  # in (0, 1), never 0
    r = x if kind == "linear" else 0.5 - 0.5 * torch.cos(math.pi * x)
    if rise:
        w[:width] = torch.minimum(w[:width], r)
    if fall:
        w[n - width :] = torch.minimum(w[n - width :], r.flip(0))
    return w


def _check(tile: int, overlap: int, kind: str) -> None:
    if tile < 1:
        raise ValueError(f"tile must be >= 1 lq pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must lie in [0, tile={tile}), got {overlap}")
    if kind not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {kind!r}")


def _noise_crop(noise, factor, top, left, th, tw):
    if noise is None:
        return {}
    t, l = int(top * factor), int(left * factor)
    return {"noise": noise[..., t : t + int(th * factor), l : l + int(tw * factor)]}


@torch.no_grad()
def upscale_tiled(
    fn: Callable,
    lq: torch.Tensor,
    scale: int,
    tile: int = 256,
    overlap: int = 32,
    ramp_kind: str = "cosine",
    progress=None,
) -> torch.Tensor:
    """sr of ``lq`` [B, 3, h, w] from tiles (float32 on the CPU). ``progress``: a tqdm bar,
    given the number of tiles as its total and updated after each tile."""
    _check(tile, overlap, ramp_kind)
    if hasattr(fn, "tiled"):
        return fn.tiled(lq, tile, overlap, progress).float()
    h, w = lq.shape[-2:]
    noise = fn.draw_noise(lq) if hasattr(fn, "draw_noise") else None
    factor = noise.shape[-1] / w if noise is not None else 1.0
    align = 1 if factor >= 1 else round(1 / factor)  # latent crops must start on whole pixels
    rows, cols = tile_spans(h, tile, overlap, align), tile_spans(w, tile, overlap, align)
    if progress is not None:
        progress.reset(total=len(rows) * len(cols))
    out = torch.zeros(lq.shape[0], 3, h * scale, w * scale, dtype=torch.float64)
    weight = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float64)
    for i, (top, bottom) in enumerate(rows):
        wy = ramp((bottom - top) * scale, overlap * scale, i > 0, i < len(rows) - 1, ramp_kind)
        for j, (left, right) in enumerate(cols):
            wx = ramp((right - left) * scale, overlap * scale, j > 0, j < len(cols) - 1, ramp_kind)
            part = lq[..., top:bottom, left:right]
            kw = _noise_crop(noise, factor, top, left, bottom - top, right - left)
            sr = fn(part, **kw).cpu().double()
            rs, cs = slice(top * scale, bottom * scale), slice(left * scale, right * scale)
            out[..., rs, cs] += sr * (wy[:, None] * wx[None, :])
            weight[..., rs, cs] += wy[:, None] * wx[None, :]
            if progress is not None:
                progress.update(1)
    return (out / weight).float()
