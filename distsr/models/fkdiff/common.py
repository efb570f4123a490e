"""What FKdiff's teacher restorer and FASRer students share: the channel LayerNorm, the prior
modulation ``x * a + b`` with ``[a, b] = Linear(Z)`` (DiffIR's way of feeding Z), the U-shaped
skeleton (Restormer / DiffIR-S1 layout), the x-scale tail, and input padding.

    lq -> 3x3 conv -> encoder level 1 .. L (pixel-unshuffle down between levels)
       -> decoder level L-1 .. 1 (pixel-shuffle up, concat the encoder skip, 1x1 reduce)
       -> refinement blocks -> x`scale` upsampler + 3x3 conv -> + nearest(lq)

Every block is called as ``block(x, z)`` with the compact prior ``z`` (B, 4 C'). The paired-layer
features handed to the distillers are the outputs of encoder levels 1-3 and of the refinement
group (strides 1, 2, 4, 1 relative to lq): the four places where the teacher (4 levels) and the
3-level students have maps of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_STRIDES = (1, 2, 4, 1)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel (in ``groups`` separate groups).

    ``bias_free`` divides by the standard deviation without centring (Restormer's BiasFree)."""

    def __init__(self, channels: int, bias_free: bool = False, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.groups, self.bias_free, self.eps = groups, bias_free, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = None if bias_free else nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b, self.groups, c // self.groups, h, w)
        var = g.var(dim=2, keepdim=True, unbiased=False)
        g = g if self.bias_free else g - g.mean(dim=2, keepdim=True)
        x = (g / torch.sqrt(var + self.eps)).reshape(b, c, h, w) * self.weight[:, None, None]
        return x if self.bias is None else x + self.bias[:, None, None]


class PriorModulation(nn.Module):
    """``x * a + b`` with ``[a, b] = Linear(z)`` per channel (DiffIR's use of the prior)."""

    def __init__(self, prior_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(prior_dim, 2 * channels, bias=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a, b = self.linear(z)[:, :, None, None].chunk(2, dim=1)
        return x * a + b


def upsampler(channels: int, scale: int) -> nn.Sequential:
    """x``scale`` by (3x3 conv to 4C, pixel-shuffle 2) per factor 2, or one x3 step (EDSR)."""
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(channels, 9 * channels, 3, padding=1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"scale must be a power of 2 or 3, got {scale}")
    return nn.Sequential(*layers)


class UShape(nn.Module):
    """The U-shaped body; ``make_block(width, level)`` builds one block of a level."""

    def __init__(
        self,
        dim: int,
        blocks: list[int],
        refinement_blocks: int,
        make_block: Callable[[int, int], nn.Module],
        *,
        reduce_level1: bool,
        scale: int,
        in_channels: int = 3,
        bias: bool = False,
    ):
        super().__init__()
        levels = len(blocks)
        assert levels >= 3, "the paired features need three encoder levels"
        widths = [dim * 2**i for i in range(levels)]
        self.scale = scale
        self.embed = nn.Conv2d(in_channels, dim, 3, padding=1, bias=bias)
        self.encoders = nn.ModuleList(
            nn.ModuleList(make_block(widths[i], i) for _ in range(blocks[i])) for i in range(levels)
        )
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w // 2, 3, padding=1, bias=bias), nn.PixelUnshuffle(2))
            for w in widths[:-1]
        )
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, bias=bias), nn.PixelShuffle(2))
            for w in widths[1:]
        )
        dec_widths = list(widths[:-1])
        if not reduce_level1:  # DiffIR-S1 / Restormer: level 1 decodes at 2 C (no 1x1 reduce)
            dec_widths[0] = 2 * widths[0]
        self.reduces = nn.ModuleList(
            nn.Conv2d(2 * w, d, 1, bias=bias) if d != 2 * w else nn.Identity()
            for w, d in zip(widths[:-1], dec_widths)
        )
        self.decoders = nn.ModuleList(
            nn.ModuleList(make_block(dec_widths[i], i) for _ in range(blocks[i]))
            for i in range(levels - 1)
        )
        out = dec_widths[0]
        self.refinement = nn.ModuleList(make_block(out, 0) for _ in range(refinement_blocks))
        self.tail = nn.Sequential(upsampler(out, scale), nn.Conv2d(out, in_channels, 3, padding=1))
        self.feature_channels = [widths[0], widths[1], widths[2], out]
        self.size_multiple = 2 ** (levels - 1)

    @staticmethod
    def _run(group: nn.ModuleList, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for block in group:
            x = block(x, z)
        return x

    def forward(self, lq: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(lq)
        skips = []
        for i, group in enumerate(self.encoders):
            x = self._run(group, x, z)
            skips.append(x)
            if i < len(self.downs):
                x = self.downs[i](x)
        for i in reversed(range(len(self.decoders))):
            x = self.reduces[i](torch.cat([self.ups[i](x), skips[i]], dim=1))
            x = self._run(self.decoders[i], x, z)
        x = self._run(self.refinement, x, z)
        feats = [skips[0], skips[1], skips[2], x]
        sr = self.tail(x) + F.interpolate(lq, scale_factor=self.scale, mode="nearest")
        return sr, feats


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Pad H, W at the bottom/right (replicate) to a multiple; returns (x, H, W) before padding."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


def run_padded(
    body: UShape, lq: torch.Tensor, z: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``body(lq, z)`` on lq padded to ``multiple``; sr cropped back to s*H x s*W (the features
    keep the padded size: feed sizes that are multiples to compare features across networks)."""
    if z.dim() != 2:
        raise ValueError(f"z must be a prior vector (B, 4 C'), got shape {tuple(z.shape)}")
    x, h, w = pad_to_multiple(lq, multiple)
    sr, feats = body(x, z)
    return sr[..., : h * body.scale, : w * body.scale], feats
