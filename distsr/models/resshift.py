"""ResShift in one place (Yue et al., NeurIPS 2023; METHODS.md §1): the typed spec, the lq
conditioning rule, the latents, the one-step rule and the encoder features.

Teacher training (``recipes.resshift``), the teacher (``teachers.resshift``), the TAD-SR student,
inference (``inference.predictors``) and the official-format export all build from a
``ResShiftSpec`` and go through ``ResShift``, so a rule changed here changes everywhere.

Images cross in [0, 1] and are mapped to [-1, 1]; ``z0 = E(gt)``, ``z_y = E(bicubic_up_s(lq))``
(``F.interpolate`` bicubic, ``align_corners=False``, as the official code), and the UNet is
conditioned on the upsampled lq in pixel space (the latent has the upsampled size) and on lq
itself in latent space (VQ-f4 at x4: the latent has lq's size; at x2 the UNet's feature
extractor, ``lq_size = 2 image_size``, maps it to the latent size).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distsr.diffusion.resshift import ResShiftDiffusion, ScheduleConfig
from distsr.models.autoencoder import AutoencoderConfig, build_autoencoder, missing_file
from distsr.models.resshift_unet import (
    RESSHIFT_REALSR_X4_KWARGS,
    Downsample,
    ResBlock,
    UNetModelSwin,
)

# Skip indices of UNetModelSwin.input_blocks the official TAD-SR feeds to its discriminator
# (hs[3], hs[6], hs[9], hs[11] of the released 12-input-block real-SR x4 UNet) + the middle block.
OFFICIAL_LEVELS: tuple[int, ...] = (3, 6, 9, 11)
MIDDLE = "mid"


@dataclass
class ResShiftSpec:
    """A ResShift network: official UNet kwargs (+ weights), first stage, schedule, scale."""

    unet: dict = field(default_factory=lambda: dict(RESSHIFT_REALSR_X4_KWARGS))
    unet_checkpoint: str | None = None  # official .pth or exported .safetensors
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale: int = 4

    def validate(self) -> list[tuple[str, str]]:
        problems = missing_file("unet_checkpoint", self.unet_checkpoint)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            problems.append(("scale", f"must be an integer >= 1, got {self.scale!r}"))
        return problems

    def all_problems(self) -> list[tuple[str, str]]:
        """Problems of every level (for specs built in code rather than parsed)."""
        nested = [
            (f"{name}.{key}", msg)
            for name in ("autoencoder", "schedule")
            for key, msg in getattr(self, name).validate()
        ]
        return self.validate() + nested


def build_unet(spec: ResShiftSpec) -> UNetModelSwin:
    """The UNet of ``spec``, strictly loaded from ``unet_checkpoint`` when one is given."""
    kwargs = copy.deepcopy(spec.unet)
    if spec.unet_checkpoint:
        return UNetModelSwin.from_official(spec.unet_checkpoint, **kwargs)
    return UNetModelSwin(**kwargs)


# ---- the lq conditioning rule ---------------------------------------------------------------
def upsample_lq(lq: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, y_up) in [-1, 1] from lq in [0, 1]; y_up = bicubic x scale, align_corners=False."""
    lq = lq * 2 - 1
    return lq, F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False)


def lq_condition(lq: torch.Tensor, y_up: torch.Tensor, latent_hw: Sequence[int]) -> torch.Tensor:
    """The UNet condition (both in [-1, 1]): ``y_up`` when the latent has its size (pixel
    space), else ``lq`` itself (latent space)."""
    return y_up if tuple(latent_hw) == tuple(y_up.shape[-2:]) else lq


# ---- encoder features (TAD-SR discriminator, paper 002 Eq. 9) --------------------------------
def input_block_channels(unet: UNetModelSwin) -> list[int]:
    """Output channels of each ``unet.input_blocks[i]`` (the skip features), read off its layers."""
    chans, ch = [], None
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, nn.Conv2d):
                ch = layer.out_channels
            elif isinstance(layer, ResBlock):
                ch = layer.out_layers[-1].out_channels
            elif isinstance(layer, Downsample) and isinstance(layer.op, nn.Conv2d):
                ch = layer.op.out_channels
            # Swin BasicLayer and pooling keep the width
        chans.append(ch)
    return chans


def check_levels(levels: Sequence, channels: Sequence[int], what: str, hint: str) -> tuple:
    """Feature levels of any encoder: distinct skip indices into ``channels`` and/or ``"mid"``;
    otherwise a ValueError naming ``what`` the encoder has and the ``hint``."""
    n = len(channels)
    levels = tuple(levels)
    bad = [
        lv
        for lv in levels
        if lv != MIDDLE and (not isinstance(lv, int) or isinstance(lv, bool) or not 0 <= lv < n)
    ]
    if bad or len(set(levels)) != len(levels) or not levels:
        raise ValueError(
            f"feature levels {list(levels)} are invalid for this UNet: it has {n} {what} "
            f"(indices 0..{n - 1}, channels {list(channels)}) and {MIDDLE!r} for the middle "
            f"block; pick distinct ones. {hint}"
        )
    return levels


def validate_levels(unet: UNetModelSwin, levels: Sequence) -> tuple:
    """Check levels (skip indices into ``unet.input_blocks`` and/or ``"mid"``)."""
    hint = (
        f"The official TAD-SR levels {list(OFFICIAL_LEVELS)} + mid fit the released 12-block "
        "UNet (channel_mult [1,2,2,4], num_res_blocks 2); a smaller UNet needs its own, e.g. "
        "the last block of each level."
    )
    return check_levels(levels, input_block_channels(unet), "input blocks", hint)


def feature_channels(unet: UNetModelSwin, levels: Sequence) -> list[int]:
    """Channel counts of ``encoder_features(unet, ..., levels)``, in order."""
    chans = input_block_channels(unet)
    middle = unet.middle_block[-1].out_layers[-1].out_channels
    return [middle if lv == MIDDLE else chans[lv] for lv in validate_levels(unet, levels)]


def encoder_features(
    unet: UNetModelSwin, x: torch.Tensor, t, lq: torch.Tensor | None, levels: Sequence
) -> list[torch.Tensor]:
    """F_k = Enc(z_t, t, y) (paper Eq. 9): the skips after ``input_blocks[levels]`` and/or the
    middle block output (``"mid"``). ``x`` is the normalised input z_t / sqrt(kappa^2 eta_t + 1).
    Gradients flow to ``x``: wrap in ``torch.no_grad()`` for real latents."""
    levels = validate_levels(unet, levels)
    t = torch.as_tensor(t, dtype=torch.long, device=x.device)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    skips, middle, _ = unet.encode(x, t, lq=lq)
    return [middle if lv == MIDDLE else skips[lv] for lv in levels]


# ---- the model ------------------------------------------------------------------------------
def net_call(net, x: torch.Tensor, t, lq: torch.Tensor) -> torch.Tensor:
    """``net(x, t, lq=lq)`` in the network's own dtype (bf16 engines), returned as float32."""
    dtype = next(net.parameters()).dtype
    return net(x.to(dtype), t, lq=lq.to(dtype)).float()


class ResShift(nn.Module):
    """UNet + first stage + diffusion of one ``ResShiftSpec``; ``prepare`` is the one place that
    turns lq into ``{"z_y", "lq"}`` (the latent of the upsampled lq and the UNet condition)."""

    def __init__(self, spec: ResShiftSpec, unet: UNetModelSwin | None = None, autoencoder=None):
        super().__init__()
        self.spec = spec
        self.unet = unet if unet is not None else build_unet(spec)
        self.autoencoder = (
            autoencoder if autoencoder is not None else build_autoencoder(spec.autoencoder)
        )
        self.diffusion = ResShiftDiffusion(spec.schedule)
        self.scale = int(spec.scale)

    @torch.no_grad()
    def prepare(self, lq: torch.Tensor, z_y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"z_y": E(bicubic_up(lq)), "lq": UNet condition}`` from lq in [0, 1]; a given
        ``z_y`` (e.g. from the teacher cache) is used instead of encoding."""
        lq, y_up = upsample_lq(lq.float(), self.scale)
        if z_y is None:
            z_y = self.autoencoder.encode(y_up)
        return {"z_y": z_y.float(), "lq": lq_condition(lq, y_up, z_y.shape[-2:])}

    @torch.no_grad()
    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(gt.float() * 2 - 1)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return ((self.autoencoder.decode(z0.float()) + 1) / 2).clamp(0, 1)

    def denoise_fn(self, net, cond: dict):
        """The ``DenoiseFn`` of ``net`` (this UNet or a student) with the condition bound."""
        return lambda x, t: net_call(net, x, t, cond["lq"])

    def one_step(self, net, z_T: torch.Tensor, cond: dict) -> torch.Tensor:
        """x0 = f(z_T / sqrt(kappa^2 eta_{T-1} + 1), T-1, lq): a one-step student (TAD-SR Alg. 1
        line 3) or the teacher's first prediction."""
        t = self.diffusion.num_timesteps - 1
        return self.diffusion.denoise(self.denoise_fn(net, cond), z_T, t)

    def features(self, net, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list:
        """Encoder features of ``net`` at the normalised z_t (see ``encoder_features``)."""
        t = self.diffusion._timesteps(t, z_t)
        x = self.diffusion.normalize_input(z_t, t)
        return encoder_features(net, x, t, cond["lq"].to(x.dtype), levels)
