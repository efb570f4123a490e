"""The SR networks spandrel lacks, with official key names: EDSR (BasicSR ``edsr_arch.py``
names; conformance/sr README §2) and SRMD (KAIR ``network_srmd.py`` names).

Both take RGB in [0, 1] and return the SR image (not clamped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distsr.models.sr.keymaps import DIV2K_RGB_MEAN


def _upsample_layers(scale: int, num_feat: int) -> list[nn.Module]:
    """[conv C->4C, PixelShuffle(2)] x log2(s), or conv C->9C + PixelShuffle(3) (no activation)."""
    if scale == 3:
        return [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    if scale < 2 or scale & (scale - 1):
        raise ValueError(f"EDSR upscale must be 2^n or 3, got {scale}")
    layers = []
    for _ in range(int(math.log2(scale))):
        layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return layers


class ResidualBlockNoBN(nn.Module):
    """x + res_scale * conv2(ReLU(conv1(x))) (EDSR residual block, no batch norm)."""

    def __init__(self, num_feat: int, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        for conv in (self.conv1, self.conv2):  # BasicSR: kaiming normal scaled by 0.1, bias 0
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale


class EDSR(nn.Module):
    """EDSR (Lim et al. 2017) with BasicSR's names; the body runs on (x - mean) * img_range."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 16,
        upscale: int = 4,
        res_scale: float = 1.0,
        img_range: float = 255.0,
        rgb_mean: tuple[float, ...] = DIV2K_RGB_MEAN,
    ):
        super().__init__()
        self.upscale, self.img_range = upscale, img_range
        # the mean is not in the official state_dict: a non-persistent buffer
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        blocks = [ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)]
        self.body = nn.Sequential(*blocks)
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = nn.Sequential(*_upsample_layers(upscale, num_feat))
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        x = self.conv_first((x - mean) * self.img_range)
        res = self.conv_after_body(self.body(x)) + x
        return self.conv_last(self.upsample(res)) / self.img_range + mean


class SRMD(nn.Module):
    """SRMD / SRMDNF (Zhang et al. 2018): ``nb`` 3x3 convs with ReLU, the last one to
    3*s^2 channels + PixelShuffle(s), on lq concatenated with a degradation map.

    The map is a per-image vector (15 PCA kernel coefficients, + the noise level for SRMD)
    spread over the image; ``in_nc`` = 3 + its length. ``forward(lq)`` uses ``self.k_pca``
    (zeros until ``set_degradation`` is called), ``forward(lq, k_pca)`` a given [B, K] vector.
    """

    def __init__(self, in_nc: int = 19, out_nc: int = 3, nc: int = 128, nb: int = 12,
                 upscale: int = 4):  # fmt: skip
        super().__init__()
        if nb < 2:
            raise ValueError(f"SRMD needs at least 2 conv layers, got nb={nb}")
        self.upscale = upscale
        self.register_buffer("k_pca", torch.zeros(in_nc - out_nc), persistent=False)
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nc, 3, 1, 1), nn.ReLU(inplace=True)]
        for _ in range(nb - 2):
            layers += [nn.Conv2d(nc, nc, 3, 1, 1), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(nc, out_nc * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale)]
        self.model = nn.Sequential(*layers)

    def set_degradation(self, k_pca) -> SRMD:
        k_pca = torch.as_tensor(k_pca, dtype=self.k_pca.dtype).flatten()
        if k_pca.numel() != self.k_pca.numel():
            raise ValueError(f"SRMD expects {self.k_pca.numel()} degradation values, "
                             f"got {k_pca.numel()}")  # fmt: skip
        self.k_pca.copy_(k_pca)
        return self

    def forward(self, x: torch.Tensor, k_pca: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        k_pca = self.k_pca.expand(b, -1) if k_pca is None else k_pca.view(b, -1)
        maps = k_pca.to(x.dtype)[:, :, None, None].expand(-1, -1, h, w)
        return self.model(torch.cat([x, maps], dim=1))
