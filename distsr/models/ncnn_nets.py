"""Plain-PyTorch RRDBNet, SRVGGNetCompact and SRMD with the official parameter names.

The state dicts of these modules use the key names of the official code, so a file saved from
them loads in BasicSR / Real-ESRGAN / KAIR (and in spandrel), and official files load here:

* ``RRDBNet`` (ESRGAN, Wang et al. 2018; BasicSR ``rrdbnet_arch``): ``conv_first``,
  ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
  ``conv_last``.
* ``SRVGGNetCompact`` (Real-ESRGAN ``srvgg_arch``): ``body.N``, convolutions and PReLUs
  interleaved in one ``ModuleList``.
* ``SRMD`` (Zhang et al. CVPR 2018; KAIR ``network_srmd``): ``model.N``, a flat ``Sequential`` of
  conv/ReLU pairs ending in conv + PixelShuffle. Its input is the LR image concatenated with the
  degradation map (15 PCA coefficients of the blur kernel, plus the noise level for SRMD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convolutions, residual scaled by 0.2 (ESRGAN Fig. 4)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for i in range(5):
            cout = num_feat if i == 4 else num_grow_ch
            setattr(self, f"conv{i + 1}", _conv3(num_feat + i * num_grow_ch, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, residual scaled by 0.2."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator. Scales 2 and 1 pixel-unshuffle the input first, as in Real-ESRGAN."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.conv_first = _conv3(num_in_ch * self.unshuffle**2, num_feat)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = _conv3(num_feat, num_feat)
        self.conv_up1 = _conv3(num_feat, num_feat)
        self.conv_up2 = _conv3(num_feat, num_feat)
        self.conv_hr = _conv3(num_feat, num_feat)
        self.conv_last = _conv3(num_feat, num_out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style net: conv/PReLU chain, PixelShuffle, plus nearest-upsampled
    input as the residual base."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
    ):
        super().__init__()
        self.upscale = upscale
        layers: list[nn.Module] = [_conv3(num_in_ch, num_feat), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [_conv3(num_feat, num_feat), nn.PReLU(num_feat)]
        layers.append(_conv3(num_feat, num_out_ch * upscale**2))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        base = F.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return self.upsampler(out) + base


class SRMD(nn.Module):
    """SRMD / SRMDNF: ``nb`` 3x3 convolutions (ReLU after all but the last), then PixelShuffle.

    ``in_nc`` = 3 + 15 (+1 noise channel for SRMD). The forward takes the already concatenated
    input; :class:`SRMDWithDegradation` builds the degradation map."""

    def __init__(self, in_nc: int = 19, out_nc: int = 3, nc: int = 128, nb: int = 12,
                 upscale: int = 4):  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(nb - 1):
            layers += [_conv3(in_nc if i == 0 else nc, nc), nn.ReLU(inplace=True)]
        layers += [_conv3(nc, out_nc * upscale**2), nn.PixelShuffle(upscale)]
        self.model = nn.Sequential(*layers)
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SRMDWithDegradation(nn.Module):
    """``net(lq) -> sr``: SRMD with a fixed degradation vector (SRMD paper §3.1, Fig. 2).

    The vector (15 kernel-PCA coefficients, then noise_level/255 for SRMD) is stretched to an
    ``H x W`` map and concatenated after the RGB channels, the channel order of KAIR's
    ``main_test_srmd.py`` and of srmd-ncnn-vulkan."""

    def __init__(self, srmd: SRMD, degradation: torch.Tensor):
        super().__init__()
        self.srmd = srmd
        self.register_buffer("degradation", degradation.reshape(1, -1, 1, 1).float())

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        n, _, h, w = lq.shape
        dmap = self.degradation.to(lq.dtype).expand(n, -1, h, w)
        return self.srmd(torch.cat([lq, dmap], 1))


class ResizeOutput(nn.Module):
    """A network followed by a bicubic resize of its output by ``factor`` (how the ncnn
    realesr-animevideov3 x2/x3 files reuse the x4 network)."""

    def __init__(self, net: nn.Module, factor: float):
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        out = self.net(lq)
        size = (int(out.shape[-2] * self.factor), int(out.shape[-1] * self.factor))
        return F.interpolate(out, size=size, mode="bicubic", align_corners=False)
