"""Training a ResShift teacher (Yue et al., ResShift, NeurIPS 2023; METHODS.md §1).

Objective: x0-prediction MSE at a uniformly drawn t,
    L = || f(z_t / sqrt(kappa^2 eta_t + 1), t, lq) - z0 ||^2,
    z_t = z0 + eta_t (z_y - z0) + kappa sqrt(eta_t) eps        (forward process q(z_t | z0, y))
in the latent space of the frozen VQ-f4 autoencoder, or in pixel space through an identity
"pixel" autoencoder for tiny configs (then the UNet is conditioned on the upsampled lq).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distsr.diffusion.resshift import ResShiftDiffusion, ScheduleConfig
from distsr.models.autoencoder import AutoencoderConfig, build_autoencoder, missing_file
from distsr.models.resshift_unet import RESSHIFT_REALSR_X4_KWARGS, UNetModelSwin
from distsr.recipes.base import Recipe, Update


@dataclass
class ResShiftConfig:
    unet: dict = field(default_factory=lambda: dict(RESSHIFT_REALSR_X4_KWARGS))
    # start from official weights, e.g. resshift_realsrx4_s15_v1.pth
    unet_checkpoint: str | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    scale: int = 4

    def validate(self):
        return missing_file("unet_checkpoint", self.unet_checkpoint)


def build_unet(cfg: ResShiftConfig) -> UNetModelSwin:
    if cfg.unet_checkpoint:
        return UNetModelSwin.from_official(cfg.unet_checkpoint, **cfg.unet)
    return UNetModelSwin(**cfg.unet)


class ResShiftRecipe(Recipe):
    Config = ResShiftConfig

    def __init__(self, cfg: ResShiftConfig, *, device, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.unet = build_unet(cfg)
        self.autoencoder = build_autoencoder(cfg.autoencoder).to(device)
        self.diffusion = ResShiftDiffusion(cfg.schedule)

    def trainable(self):
        return {"unet": self.unet}

    def ema_targets(self):
        return ["unet"]

    @torch.no_grad()
    def latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z0, z_y, lq condition) from a batch of gt/lq images in [0, 1]."""
        gt = batch["gt"].to(self.device) * 2 - 1
        lq = batch["lq"].to(self.device) * 2 - 1
        # official: y is upsampled with F.interpolate(bicubic, align_corners=False) before encoding
        y_up = F.interpolate(lq, scale_factor=self.cfg.scale, mode="bicubic", align_corners=False)
        z0 = self.autoencoder.encode(gt)
        z_y = self.autoencoder.encode(y_up)
        # pixel space: condition on the upsampled lq; latent space: on lq itself (the UNet's
        # feature extractor brings it to the latent size when they differ, e.g. x2 with VQ-f4)
        cond = y_up if z_y.shape[-2:] == y_up.shape[-2:] else lq
        return z0, z_y, cond

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        z0, z_y, cond = self.latents(batch)
        t = torch.randint(0, self.diffusion.num_timesteps, (z0.shape[0],), device=self.device)
        noise = torch.randn_like(z0)
        cond = cond.to(self.dtype)

        def denoise(x, timesteps):
            return self.nets["unet"](x.to(self.dtype), timesteps, lq=cond).float()

        loss = self.diffusion.training_loss(denoise, z0, z_y, t, noise)
        yield Update("unet", loss)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | one-step x0 from the prior (t = T-1) | gt, for the first 4 samples."""
        batch = {k: batch[k][:4] for k in ("gt", "lq")}
        z0, z_y, cond = self.latents(batch)
        t = torch.full((z0.shape[0],), self.diffusion.num_timesteps - 1, device=self.device)
        z_t = self.diffusion.prior_sample(z_y, torch.randn_like(z_y))
        x0 = self.nets["unet"](self.diffusion.normalize_input(z_t, t).to(self.dtype), t,
                               lq=cond.to(self.dtype)).float()  # fmt: skip

        def image(z):
            return ((self.autoencoder.decode(z).float() + 1) / 2).clamp(0, 1)

        return {"bicubic": image(z_y), "one step": image(x0), "gt": image(z0)}
