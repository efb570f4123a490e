"""The ResShift denoiser ``UNetModelSwin``, key-compatible with the official releases.

Re-implements ``models/unet.py::UNetModelSwin`` of zsyOAOA/ResShift with the official module and
parameter names, so released checkpoints load with strict key matching. Facts implemented here
are listed in conformance/resshift/README.md §1 (cited as "README §1").

Call as ``unet(x, timesteps, lq=lq)``: ``x`` is the already normalised latent
``z_t / sqrt(kappa^2 eta_t + 1)``, ``timesteps`` the integer step indices 0..T-1, ``lq`` the
low-quality image in [-1, 1] at the latent's spatial size.
"""

from __future__ import annotations

import copy
import math
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.swin import BasicLayer, GroupNorm32

# Constructor kwargs of the released real-SR x4 model (v1/v2 and journal v3 alike), README §1.
RESSHIFT_REALSR_X4_KWARGS: dict = {
    "image_size": 64,
    "in_channels": 3,
    "model_channels": 160,
    "out_channels": 3,
    "attention_resolutions": [64, 32, 16, 8],
    "dropout": 0,
    "channel_mult": [1, 2, 2, 4],
    "num_res_blocks": [2, 2, 2, 2],
    "conv_resample": True,
    "dims": 2,
    "use_fp16": False,
    "num_head_channels": 32,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "swin_depth": 2,
    "swin_embed_dim": 192,
    "window_size": 8,
    "mlp_ratio": 4,
    "cond_lq": True,
    "lq_size": 64,
}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos | sin], freqs exp(-ln(max_period) i / half) (README §1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to the ResBlocks among its children."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """3x3 conv, stride 2, symmetric padding 1 (``op``); average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, time-embedding FiLM, GN-SiLU-Dropout-conv(zero init), plus skip (README §1)."""

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_scale_shift_norm=False,
        up=False,
        down=False,
        norm_groups=32,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)  # official zero_module
        nn.init.zeros_(self.out_layers[-1].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # first half scale, second half shift
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetModelSwin(nn.Module):
    """ResShift's UNet with Swin layers; constructor kwargs as the official class (README §1).

    ``num_heads`` is used only when ``num_head_channels == -1``; otherwise every Swin layer has
    ``swin_embed_dim // num_head_channels`` heads. ``use_fp16`` (official) casts the torso input and
    time embedding to float16, which needs :meth:`convert_to_fp16`; without it no cast is done.

    ``norm_groups`` (not an official kwarg; default 32 as the official network) is the group
    count of every GroupNorm. Keep a few channels per group: with ``model_channels = 32`` and 32
    groups the output head's norm is an instance norm that removes each feature map's spatial
    mean, so colour reaches the output only through the maps' shape near the image border and is
    lost on images larger than the training crops. Parameter names and shapes do not depend on it.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        swin_depth=2,
        swin_embed_dim=96,
        window_size=8,
        mlp_ratio=2.0,
        patch_norm=False,
        cond_lq=True,
        cond_mask=False,
        lq_size=256,
        norm_groups=32,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"UNetModelSwin supports only dims=2 (Swin is 2-D), got dims={dims}")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if len(num_res_blocks) != len(channel_mult):
            raise ValueError(
                f"num_res_blocks {list(num_res_blocks)} needs one entry per channel_mult level "
                f"({len(channel_mult)})"
            )
        if num_head_channels == -1:
            self.swin_heads = num_heads
        elif num_head_channels <= 0 or swin_embed_dim % num_head_channels:
            raise ValueError(
                f"swin_embed_dim {swin_embed_dim} must be a multiple of num_head_channels "
                f"{num_head_channels}"
            )
        else:
            self.swin_heads = swin_embed_dim // num_head_channels
        self.model_channels, self.cond_lq, self.cond_mask = model_channels, cond_lq, cond_mask
        self.use_fp16 = use_fp16
        self.num_res_blocks = list(num_res_blocks)
        self._swin_kw = dict(
            embed_dim=swin_embed_dim,
            num_heads=self.swin_heads,
            window_size=window_size,
            depth=swin_depth,
            mlp_ratio=mlp_ratio,
            patch_norm=patch_norm,
            norm_groups=norm_groups,
        )
        emb_dim = model_channels * 4
        self._block_kw = dict(
            emb_channels=emb_dim,
            dropout=dropout,
            use_scale_shift_norm=use_scale_shift_norm,
            norm_groups=norm_groups,
        )
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        lq_chans = self._build_feature_extractor(image_size, lq_size)
        widths = [int(mult * model_channels) for mult in channel_mult]
        attn_res = list(attention_resolutions)
        updown = (conv_resample, resblock_updown)
        skips = self._build_encoder(in_channels + lq_chans, widths, image_size, attn_res, updown)
        ds = image_size // 2 ** (len(widths) - 1)
        ch = widths[-1]
        swin_mid = BasicLayer(ch, img_size=ds, **self._swin_kw)
        self.middle_block = TimestepEmbedSequential(self._res(ch), swin_mid, self._res(ch))
        self._build_decoder(skips, widths, ds, attn_res, updown)
        self.out = nn.Sequential(
            GroupNorm32(widths[0], norm_groups),
            nn.SiLU(),
            nn.Conv2d(widths[0], out_channels, 3, padding=1),
        )

    def _res(self, ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
        return ResBlock(ch_in, out_channels=ch_out, **self._block_kw, **kw)

    def _build_encoder(self, in_chans, widths, ds, attn_res, updown) -> list[int]:
        """input_blocks: conv, then per level ResBlock(+Swin on the first), ..., Downsample."""
        conv_resample, resblock_updown = updown
        ch = widths[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_chans, ch, 3, padding=1))]
        )
        skips = [ch]
        for level, width in enumerate(widths):
            for j in range(self.num_res_blocks[level]):
                layers = [self._res(ch, width)]
                ch = width
                if ds in attn_res and j == 0:  # Swin on a level's first block only
                    layers.append(BasicLayer(ch, img_size=ds, **self._swin_kw))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(widths) - 1:  # no Downsample after the last level
                if resblock_updown:
                    down = self._res(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skips.append(ch)
                ds //= 2
        return skips

    def _build_decoder(self, skips, widths, ds, attn_res, updown) -> None:
        """output_blocks: n+1 ResBlocks per level (Swin on the first, Upsample after the last)."""
        conv_resample, resblock_updown = updown
        ch = widths[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [self._res(ch + skips.pop(), widths[level])]
                ch = widths[level]
                if ds in attn_res and i == 0:
                    layers.append(BasicLayer(ch, img_size=ds, **self._swin_kw))
                if level and i == self.num_res_blocks[level]:
                    if resblock_updown:
                        layers.append(self._res(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, ch))
                    ds *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def _build_feature_extractor(self, image_size: int, lq_size: int) -> int:
        """Identity when lq_size == image_size (realsr), else a conv/SiLU/stride-2 stack.

        Mirrors the official branch exactly (also taken when cond_lq is False), for key
        compatibility. Returns how many channels the lq branch adds to the first conv.
        """
        lq_in = 4 if self.cond_mask else 3
        if self.cond_lq and lq_size == image_size:
            self.feature_extractor = nn.Identity()
            return lq_in
        layers, chans = [], 16
        for _ in range(int(math.log(lq_size / image_size) / math.log(2))):
            layers += [nn.Conv2d(lq_in, chans, 3, 1, 1), nn.SiLU()]
            layers.append(Downsample(chans, True, out_channels=chans * 2))
            chans *= 2
            lq_in = chans
        self.feature_extractor = nn.Sequential(*layers)
        return chans

    def _condition(self, x, lq, mask):
        """cat([x, feature_extractor(lq)], 1): lq goes after the latent (README §1)."""
        if lq is None:
            if self.cond_lq:
                raise ValueError("this UNet was built with cond_lq=True: call unet(x, t, lq=lq)")
            return x
        if not self.cond_lq:
            raise ValueError("lq was given but this UNet was built with cond_lq=False")
        if mask is not None:
            if not self.cond_mask:
                raise ValueError("mask was given but this UNet was built with cond_mask=False")
            lq = torch.cat([lq, mask], dim=1)
        return torch.cat([x, self.feature_extractor(lq.to(x.dtype))], dim=1)

    def encode(self, x, timesteps, lq=None, mask=None):
        """Encoder half: (skip features of every input block, middle block output, time emb)."""
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        h = self._condition(x, lq, mask)
        if self.use_fp16:
            emb, h = emb.half(), h.half()
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return skips, self.middle_block(h, emb), emb

    def forward(self, x, timesteps, lq=None, mask=None):
        """Predict x0 from the normalised latent ``x`` at integer ``timesteps``."""
        skips, h, emb = self.encode(x, timesteps, lq, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # decoder skip: h first
        return self.out(h.to(x.dtype))

    def _convert(self, dtype: torch.dtype) -> None:
        torso = (self.input_blocks, self.feature_extractor, self.middle_block, self.output_blocks)
        for part in torso:
            for m in part.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    m.to(dtype)

    def convert_to_fp16(self) -> None:
        """Official mixed precision: convs/linears of the torso in float16, norms stay float32."""
        self._convert(torch.float16)

    def convert_to_fp32(self) -> None:
        self._convert(torch.float32)

    @classmethod
    def from_official(cls, path: str | PathLike, **ctor_kwargs) -> UNetModelSwin:
        """Build (default: the released real-SR x4 kwargs) and strictly load an official file.

        Returns the model in eval mode.
        """
        from distsr.models.checkpoint import load_official_state_dict

        kwargs = copy.deepcopy(ctor_kwargs or RESSHIFT_REALSR_X4_KWARGS)
        model = cls(**kwargs)
        load_official_state_dict(path, model, model_name=f"ResShift {cls.__name__}")
        return model.eval()
