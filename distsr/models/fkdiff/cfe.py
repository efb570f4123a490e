"""The condensed feature extractors CFE_D and CFE_R (paper 000, Sec. 3.1; DiffIR's CPEN).

    CFE_D:  Z = CFE_D(Down(Concat(gt, lq)))     (stage 1, trained with the teacher, then frozen)
    CFE_R:  D = CFE_R(lq)                        (the guide of the prior denoiser)

For x4 SR "Down" brings gt to the lq grid by pixel-unshuffle (s^2 * 3 channels), as DiffIR's
x4 stage-1 extractor does; lq is already on that grid. The network: 3x3 conv + LeakyReLU,
``res_blocks`` residual blocks (conv-ReLU-conv + skip), three 3x3 convs C' -> 2C' -> 2C' -> 4C'
with LeakyReLU, global average pooling, and a 2-layer MLP (LeakyReLU after each): a compact
vector of 4 C' entries per image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.fkdiff.config import CFEConfig


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class ResBlock(nn.Module):
    """x + conv(relu(conv(x))) (EDSR-style, no scaling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CFE(nn.Module):
    """``CFE("D")(lq, gt)`` or ``CFE("R")(lq)`` -> z (B, 4 C')."""

    def __init__(
        self,
        mode: Literal["D", "R"],
        cfg: CFEConfig | None = None,
        scale: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        if mode not in ("D", "R"):
            raise ValueError(f"CFE mode must be 'D' (lq + gt) or 'R' (lq only), got {mode!r}")
        cfg = cfg or CFEConfig()
        self.mode, self.scale = mode, scale
        c = cfg.prior_channels
        c_in = in_channels * (1 + scale**2) if mode == "D" else in_channels
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c, 3, padding=1),
            _lrelu(),
            *[ResBlock(c) for _ in range(cfg.res_blocks)],
            nn.Conv2d(c, 2 * c, 3, padding=1),
            _lrelu(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            _lrelu(),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1),
            _lrelu(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.mlp = nn.Sequential(
            nn.Linear(4 * c, 4 * c), _lrelu(), nn.Linear(4 * c, 4 * c), _lrelu()
        )
        self.out_features = 4 * c

    def forward(self, lq: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "D":
            if gt is None:
                raise ValueError("CFE_D needs gt: Z = CFE_D(Down(Concat(gt, lq)))")
            x = torch.cat([lq, F.pixel_unshuffle(gt, self.scale)], dim=1)
        else:
            if gt is not None:
                raise ValueError("CFE_R sees lq only (D = CFE_R(lq)); gt was given")
            x = lq
        return self.mlp(self.body(x))
