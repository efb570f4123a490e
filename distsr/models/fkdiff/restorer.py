"""FKdiff's teacher restorer (paper 000, Sec. 3.1 and 4.1: "our teacher network used DiffIRS1").

DiffIR's stage-1 generator: a 4-level U-shaped Restormer whose every attention and feed-forward
first modulates its input with the compact prior, ``x * a + b`` with ``[a, b] = Linear(Z)``:

* MDTA (transposed attention): 1x1 conv -> 3x3 depthwise conv -> q, k, v per head;
  q, k L2-normalised over pixels; ``softmax(q k^T * temperature) v`` (C x C attention); 1x1 conv.
* GDFN: 1x1 conv to 2 hidden -> 3x3 depthwise -> GELU(x1) * x2 -> 1x1 conv.
* block: ``x + MDTA(LN(x), Z)`` then ``x + GDFN(LN(x), Z)``.

``forward(lq, z) -> (sr, feats)``: sr at x``scale`` (lq and sr in [0, 1]), feats = the paired-layer
features (see ``common``), channels in ``feature_channels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.fkdiff.common import (
    FEATURE_STRIDES,
    LayerNorm2d,
    PriorModulation,
    UShape,
    run_padded,
)
from distsr.models.fkdiff.config import FKdiffNetConfig


class MDTA(nn.Module):
    def __init__(self, dim: int, heads: int, prior_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.prior = PriorModulation(prior_dim, dim)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_dw(self.qkv(self.prior(x, z)))
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in qkv.chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).reshape(b, c, h, w))


class GDFN(nn.Module):
    def __init__(self, dim: int, expansion: float, prior_dim: int, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.prior = PriorModulation(prior_dim, dim)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dw = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dw(self.project_in(self.prior(x, z))).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TeacherBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cfg: FKdiffNetConfig):
        super().__init__()
        prior_dim, bias_free = 4 * cfg.prior_channels, cfg.layernorm == "bias_free"
        self.norm1 = LayerNorm2d(dim, bias_free=bias_free)
        self.attn = MDTA(dim, heads, prior_dim, cfg.bias)
        self.norm2 = LayerNorm2d(dim, bias_free=bias_free)
        self.ffn = GDFN(dim, cfg.ffn_expansion, prior_dim, cfg.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), z)
        return x + self.ffn(self.norm2(x), z)


class FKdiffTeacherNet(nn.Module):
    """``forward(lq, z) -> (sr, feats)``; z = CFE_D(lq, gt) in stage 1, the sampled prior later."""

    feature_strides = FEATURE_STRIDES

    def __init__(self, cfg: FKdiffNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FKdiffNetConfig()
        self.body = UShape(
            cfg.dim,
            cfg.blocks,
            cfg.refinement_blocks,
            lambda width, level: TeacherBlock(width, cfg.heads[level], cfg),
            reduce_level1=False,
            scale=cfg.scale,
            in_channels=cfg.in_channels,
            bias=cfg.bias,
        )
        self.scale = cfg.scale
        self.feature_channels: list[int] = self.body.feature_channels
        self.size_multiple = self.body.size_multiple  # lq sides are padded to this

    def forward(self, lq: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_padded(self.body, lq, z, self.size_multiple)
