"""The ResShift teacher (Yue et al., NeurIPS 2023; METHODS.md §1) behind the ``Teacher`` interface.

Latents exactly as ``distsr.recipes.resshift`` makes them from images in [0, 1]: images go to
[-1, 1], ``z0 = E(gt)``, ``z_y = E(bicubic_up_s(lq))`` (``F.interpolate`` bicubic,
``align_corners=False``), and the UNet condition is ``lq`` when the latent has lq's size (VQ-f4
at x4) and the upsampled lq otherwise (pixel space). The default sampler is the deterministic
SinSR chain, so a target is a function of ``(z_y, eps)`` only (METHODS.md §1-2); the stochastic
official sampler draws its step noises from the same per-sample generator as the prior eps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from distsr.data.shards import stable_seed
from distsr.diffusion.resshift import ResShiftDiffusion, ScheduleConfig
from distsr.models.autoencoder import AutoencoderConfig, build_autoencoder, missing_file
from distsr.models.resshift_unet import RESSHIFT_REALSR_X4_KWARGS, UNetModelSwin
from distsr.teachers.base import Teacher, hash_modules

SAMPLERS = ("deterministic", "stochastic")


@dataclass
class TeacherConfig:
    """A frozen ResShift teacher: official UNet kwargs + weights, first stage, schedule, sampler."""

    kind: Literal["resshift"] = "resshift"
    unet: dict = field(default_factory=lambda: dict(RESSHIFT_REALSR_X4_KWARGS))
    unet_checkpoint: str | None = None  # e.g. resshift_realsrx4_s15_v1.pth (required)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: Literal["deterministic", "stochastic"] = "deterministic"
    scale: int = 4

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.kind != "resshift":
            problems.append(("kind", f"must be one of ['resshift'], got {self.kind!r}"))
        if not self.unet_checkpoint:
            problems.append(("unet_checkpoint", "a teacher needs trained UNet weights (a path)"))
        problems += missing_file("unet_checkpoint", self.unet_checkpoint)
        if self.sampler not in SAMPLERS:
            problems.append(("sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            problems.append(("scale", f"must be an integer >= 1, got {self.scale!r}"))
        return problems

    def all_problems(self) -> list[tuple[str, str]]:
        """Problems of every level (for configs built in code rather than by ``from_dict``)."""
        nested = [
            (f"{name}.{key}", msg)
            for name in ("autoencoder", "schedule")
            for key, msg in getattr(self, name).validate()
        ]
        return self.validate() + nested


def noise_for(keys: Sequence[str], shape: Sequence[int], seed: int, draws: int = 1) -> torch.Tensor:
    """Per-sample latent noise: sample ``key`` draws from a CPU ``torch.Generator`` seeded with
    ``stable_seed(seed, key)``, so any process on any device regenerates the same z_T.
    ``shape`` is one sample's ``(C, H, W)`` (or ``(B, C, H, W)`` with B = len(keys)). Returns
    ``[B, C, H, W]`` for ``draws == 1``, else ``[draws, B, C, H, W]`` (prior eps first)."""
    shape = tuple(shape)
    if len(shape) == 4:
        if shape[0] != len(keys):
            raise ValueError(f"noise shape {shape} has batch {shape[0]} for {len(keys)} keys")
        shape = shape[1:]
    return noise_from_seeds([stable_seed(seed, key) for key in keys], shape, draws)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], draws: int = 1) -> torch.Tensor:
    """``noise_for`` from the per-sample seeds themselves (what the cache stores)."""
    per_sample = []
    for sample_seed in seeds:
        gen = torch.Generator().manual_seed(int(sample_seed))
        per_sample.append(torch.randn((draws, *shape), generator=gen))
    noise = torch.stack(per_sample, dim=1)  # [draws, B, C, H, W]
    return noise[0] if draws == 1 else noise


def upsample_lq(lq: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, y_up) in [-1, 1] from lq in [0, 1]; y_up = bicubic x scale (``recipes.resshift``)."""
    lq = lq * 2 - 1
    return lq, F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False)


def lq_condition(lq: torch.Tensor, scale: int, latent_hw: Sequence[int]) -> torch.Tensor:
    """The UNet condition from lq in [0, 1], as ``recipes.resshift`` conditions its UNet: the
    upsampled lq in pixel space (the latent has the upsampled size), else lq itself (VQ-f4: the
    latent's size at x4; at x2 the UNet's feature extractor (lq_size = 2 image_size) maps it)."""
    lq, y_up = upsample_lq(lq, scale)
    return y_up if tuple(latent_hw) == tuple(y_up.shape[-2:]) else lq


class ResShiftTeacher(Teacher):
    """Frozen ResShift UNet + first stage + residual-shifting sampler."""

    kind = "resshift"

    def __init__(self, cfg: TeacherConfig, unet: UNetModelSwin, autoencoder: torch.nn.Module):
        super().__init__()
        self.cfg = cfg
        self.unet = unet
        self.autoencoder = autoencoder
        self.diffusion = ResShiftDiffusion(cfg.schedule)
        self.freeze()
        self._weights_hash: str | None = None

    @property
    def noise_draws(self) -> int:
        # stochastic: the prior eps, then one eps per step in the official order (README §2)
        return 1 if self.cfg.sampler == "deterministic" else 1 + self.diffusion.num_timesteps

    # ---- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, lq: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"z_y": E(bicubic_up(lq)), "lq": UNet condition}`` from lq in [0, 1]."""
        lq, y_up = upsample_lq(lq.to(self.device, torch.float32), self.cfg.scale)
        z_y = self.autoencoder.encode(y_up)
        return {"z_y": z_y, "lq": y_up if z_y.shape[-2:] == y_up.shape[-2:] else lq}

    @torch.no_grad()
    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(gt.to(self.device, torch.float32) * 2 - 1)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        image = self.autoencoder.decode(z0.to(self.device, torch.float32))
        return ((image + 1) / 2).clamp(0, 1)

    # ---- diffusion --------------------------------------------------------------------------
    def _denoise_fn(self, cond: dict):
        lq = cond["lq"]
        return lambda x, t: self.unet(x, t, lq=lq)

    def _prior_noise(self, noise: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
        noise = noise.to(z_y.device, z_y.dtype)
        return noise if noise.dim() == z_y.dim() else noise[0]

    def prior(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_T = z_y + kappa sqrt(eta_T) eps (METHODS.md §1, prior)."""
        z_y = cond["z_y"]
        return self.diffusion.prior_sample(z_y, self._prior_noise(noise, z_y))

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """The full T-step trajectory from z_T = prior(cond, noise) (METHODS.md §2, step 1)."""
        z_y, fn = cond["z_y"], self._denoise_fn(cond)
        if self.cfg.sampler == "deterministic":
            return self.diffusion.sample_deterministic(fn, z_y, self._prior_noise(noise, z_y))
        if noise.dim() != z_y.dim() + 1 or noise.shape[0] != self.noise_draws:
            raise ValueError(
                f"the stochastic sampler needs noise [{self.noise_draws}, B, C, H, W] (prior eps "
                f"+ one per step; noise_for(..., draws=teacher.noise_draws)), got "
                f"{tuple(noise.shape)}"
            )
        noise = noise.to(z_y.device, z_y.dtype)
        return self.diffusion.sample_stochastic(fn, z_y, noise[0], list(noise[1:]))

    def denoise(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """x0_hat = f(z_t / sqrt(kappa^2 eta_t + 1), t, lq) (METHODS.md §1, network)."""
        return self.diffusion.denoise(self._denoise_fn(cond), z_t, t)

    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """Encoder features of the normalised input (TAD-SR discriminator, METHODS.md §2):
        ``levels`` holds indices into the UNet's input-block outputs (official TAD-SR: 3, 6, 9,
        11) and/or ``"mid"`` for the middle block. Gradients flow to ``z_t``."""
        t = self.diffusion._timesteps(t, z_t)
        skips, mid, _ = self.unet.encode(self.diffusion.normalize_input(z_t, t), t, lq=cond["lq"])
        out = []
        for level in levels:
            if level == "mid":
                out.append(mid)
            elif isinstance(level, int) and -len(skips) <= level < len(skips):
                out.append(skips[level])
            else:
                raise ValueError(f"feature level {level!r}: use 0..{len(skips) - 1} or 'mid'")
        return out

    # ---- identity ---------------------------------------------------------------------------
    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:  # frozen weights: hash once
            arch = {"unet": self.cfg.unet, "autoencoder": self.cfg.autoencoder.kind}
            modules = [("unet", self.unet), ("autoencoder", self.autoencoder)]
            self._weights_hash = hash_modules(modules, extra=arch)
        return {
            "kind": self.kind,
            "weights": self._weights_hash,
            "sampler": self.cfg.sampler,
            "schedule": asdict(self.cfg.schedule),
            "scale": self.cfg.scale,
        }


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> ResShiftTeacher:
    """Load the UNet strictly from ``cfg.unet_checkpoint`` and the first stage; frozen, eval."""
    problems = cfg.all_problems()
    if problems:
        lines = "; ".join(f"{key}: {msg}" for key, msg in problems)
        raise ValueError(f"invalid teacher config: {lines}")
    unet = UNetModelSwin.from_official(cfg.unet_checkpoint, **copy.deepcopy(cfg.unet))
    teacher = ResShiftTeacher(cfg, unet, build_autoencoder(cfg.autoencoder))
    return teacher.to(device)
