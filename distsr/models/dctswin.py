"""The DCTSwin knowledge-aggregation network of MTKD (Jiang et al., paper 004, Sec. 3.1;
METHODS.md §4): N teachers' SR outputs -> one enhanced SR image ``mt_hr``.

    [sr_1 .. sr_N] (concat on channels) -> pixel-unshuffle by s -> 3x3 conv to C  = F_s
    -> B DCTSwin blocks, each L DCTSwin layers + 3x3 conv, residual       (Sec. 3.1.1)
    -> 3x3 conv = F_d;  F_d + F_s -> 3x3 conv to 3 s^2 -> pixel-shuffle by s = mt_hr

A DCTSwin layer (Sec. 3.1.2) is a Swin layer whose attention runs on DCT coefficients:
    x + window_reverse(IDCT(W-MSA(DCT(window_partition(shift(LN(x)))))))   then   x + MLP(LN(x))
with a 2-D orthonormal DCT-II per Ws x Ws window and channel. Odd layers shift the windows by
Ws/2 (cyclic, as Swin). Swin masks attention between pixels that the cyclic shift brought
together; after the DCT every token (a frequency) mixes the whole window, so no pixel mask
applies and shifted windows attend without one. The relative-position bias indexes frequency
offsets. The paper's C = 24, B = 4, L = 2, Ws = 8 are the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.swin import WindowAttention


@dataclass
class DCTSwinConfig:
    """Hyper-parameters of the aggregator (the teacher count and scale come from the teachers)."""

    channels: int = 24  # C
    blocks: int = 4  # B
    layers: int = 2  # L per block
    window: int = 8  # Ws
    heads: int = 6
    mlp_ratio: float = 2.0
    # add the mean of the teachers' outputs to mt_hr (not in the paper: the network then only
    # learns a correction, which converges in far fewer steps)
    mean_skip: bool = False

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for key in ("channels", "blocks", "layers", "window", "heads"):
            if getattr(self, key) < 1:
                problems.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if self.heads >= 1 and self.channels % self.heads:
            problems.append(("heads", f"must divide channels={self.channels}"))
        return problems


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D [n, n]: X = D x (so x = D^T X), float64."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def dct2(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II of windows x [..., Ws, Ws, C] over the two window axes: D x D^T."""
    return torch.einsum("uh,...hwc,vw->...uvc", d, x, d)


def idct2(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The inverse of ``dct2``: D^T X D."""
    return torch.einsum("uh,...uvc,vw->...hwc", d, x, d)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, ws, ws, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, ws, ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class DCTSwinLayer(nn.Module):
    """One DCTSTL on [B, H, W, C] maps (H, W multiples of the window)."""

    def __init__(self, dim: int, window: int, heads: int, mlp_ratio: float, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer("dct", dct_matrix(window).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, d = self.window, self.dct.to(x.dtype)
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        coeffs = dct2(window_partition(y, ws), d)  # LN -> window partition -> DCT
        coeffs = self.attn(coeffs.reshape(-1, ws * ws, c)).view(-1, ws, ws, c)  # (S)W-MSA
        y = window_reverse(idct2(coeffs, d), ws, h, w)  # IDCT -> window reverse
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y  # residual
        return x + self.mlp(self.norm2(x))


class DCTSwinBlock(nn.Module):
    """L DCTSwin layers (shift on the odd ones) and a 3x3 conv, with a residual connection."""

    def __init__(self, dim: int, layers: int, window: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(
            DCTSwinLayer(dim, window, heads, mlp_ratio, shift=(window // 2) * (i % 2))
            for i in range(layers)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]."""
        y = x.permute(0, 2, 3, 1)
        for layer in self.layers:
            y = layer(y)
        return x + self.conv(y.permute(0, 3, 1, 2))


class DCTSwin(nn.Module):
    """``forward(srs [B, 3 N, sH, sW]) -> mt_hr [B, 3, sH, sW]`` for N teachers at scale s."""

    def __init__(self, num_inputs: int, scale: int, cfg: DCTSwinConfig | None = None,
                 in_chans: int = 3):  # fmt: skip
        super().__init__()
        cfg = cfg or DCTSwinConfig()
        self.num_inputs, self.scale, self.cfg, self.in_chans = num_inputs, scale, cfg, in_chans
        c = cfg.channels
        self.unshuffle = nn.PixelUnshuffle(scale)
        self.conv_first = nn.Conv2d(in_chans * num_inputs * scale**2, c, 3, 1, 1)
        self.blocks = nn.ModuleList(
            DCTSwinBlock(c, cfg.layers, cfg.window, cfg.heads, cfg.mlp_ratio)
            for _ in range(cfg.blocks)
        )
        self.conv_after_body = nn.Conv2d(c, c, 3, 1, 1)
        self.upsample = nn.Sequential(nn.Conv2d(c, in_chans * scale**2, 3, 1, 1),
                                      nn.PixelShuffle(scale))  # fmt: skip

    def forward(self, srs: torch.Tensor) -> torch.Tensor:
        h, w = srs.shape[-2:]
        channels = self.in_chans * self.num_inputs
        if srs.shape[1] != channels:
            raise ValueError(f"DCTSwin for {self.num_inputs} teachers takes {channels} channels, "
                             f"got {srs.shape[1]}")  # fmt: skip
        unit = self.scale * self.cfg.window  # pad so the unshuffled map tiles into windows
        pad_h, pad_w = (-h) % unit, (-w) % unit
        x = F.pad(srs, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else srs
        f_s = self.conv_first(self.unshuffle(x))  # shallow features F_s
        f_d = f_s
        for block in self.blocks:
            f_d = block(f_d)
        out = self.upsample(self.conv_after_body(f_d) + f_s)[..., :h, :w]
        if self.cfg.mean_skip:
            out = out + srs.view(srs.shape[0], self.num_inputs, self.in_chans, h, w).mean(1)
        return out
