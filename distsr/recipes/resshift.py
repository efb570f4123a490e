"""Training a ResShift teacher (Yue et al., ResShift, NeurIPS 2023; METHODS.md §1).

Objective: x0-prediction MSE at a uniformly drawn t,
    L = || f(z_t / sqrt(kappa^2 eta_t + 1), t, lq) - z0 ||^2,
    z_t = z0 + eta_t (z_y - z0) + kappa sqrt(eta_t) eps        (forward process q(z_t | z0, y))
in the latent space of the frozen VQ-f4 autoencoder, or in pixel space through an identity
"pixel" autoencoder for tiny configs. Latents and the lq condition come from
``models.resshift.ResShift.prepare``, the rule the teacher, the student and inference share.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from distsr.models.resshift import ResShift, ResShiftSpec, build_unet
from distsr.recipes.base import Recipe, Update


class ResShiftRecipe(Recipe):
    Config = ResShiftSpec  # the network spec; unet_checkpoint (optional) is the init

    def __init__(self, cfg: ResShiftSpec, *, device):
        super().__init__(cfg, device=device)
        self.net = build_unet(cfg)  # trained; official weights as init when given
        self.model = ResShift(cfg, unet=self.net).to(device)
        self.diffusion = self.model.diffusion

    @classmethod
    def student_spec(cls, cfg: ResShiftSpec) -> ResShiftSpec:
        return cfg

    def trainable(self):
        return {"unet": self.net}

    def ema_targets(self):
        return ["unet"]

    def latents(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(z0, cond = {"z_y", "lq"}) from a batch of gt/lq images in [0, 1]."""
        cond = self.model.prepare(batch["lq"].to(self.device))
        return self.model.encode_gt(batch["gt"].to(self.device)), cond

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        z0, cond = self.latents(batch)
        t = torch.randint(0, self.diffusion.num_timesteps, (z0.shape[0],), device=self.device)
        denoise = self.model.denoise_fn(self.nets["unet"], cond)
        loss = self.diffusion.training_loss(denoise, z0, cond["z_y"], t, torch.randn_like(z0))
        yield Update("unet", loss)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | one-step x0 from the prior (t = T-1) | gt, for the first 4 samples."""
        z0, cond = self.latents({k: batch[k][:4] for k in ("gt", "lq")})
        z_T = self.diffusion.prior_sample(cond["z_y"], torch.randn_like(cond["z_y"]))
        x0 = self.model.one_step(self.nets["unet"], z_T, cond)
        decode = self.model.decode
        return {"bicubic": decode(cond["z_y"]), "one step": decode(x0), "gt": decode(z0)}
