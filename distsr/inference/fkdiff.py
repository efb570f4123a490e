"""FKdiff's FASRer students as predictors: ``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*s,w*s]``.

FASRer reconstructs from lq and a compact prior Z_hat (paper 000, Sec. 3.2), which at inference
comes from the teacher's prior diffusion: D = CFE_R(lq), then the T reverse steps of the MLP
denoiser from Z_T ~ N(0, I) (``teachers.fkdiff.PriorNets``, the weights of the run's
``method.teacher.prior_checkpoint``). The T + 1 noise vectors come from a fresh CPU generator
seeded with ``seed`` on every call (a result depends on the image, its place in the batch and
the seed). FASRer pads lq to its size multiple itself and crops the output back.

The prior is one vector per image: tiled upscaling (``tiled``) computes it once from the whole
image and runs FASRer tile by tile with it.
"""

from __future__ import annotations

import torch

from distsr.models.fkdiff.prior import PriorSchedule


class FASRerPredictor:
    """A FASRer student with the prior diffusion that feeds it Z_hat."""

    steps = 1  # one FASRer pass; the prior's T steps run on a 4 C' vector

    def __init__(self, net, prior, schedule: PriorSchedule, seed: int = 0):
        self.net = net.eval().requires_grad_(False)
        self.prior = prior.eval().requires_grad_(False)
        self.schedule, self.seed, self.scale = schedule, int(seed), net.scale

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def num_params(self) -> int:
        """FASRer and the prior parts it needs at inference (CFE_R + denoiser)."""
        return sum(p.numel() for m in (self.net, self.prior) for p in m.parameters())

    def prior_noise(self, batch: int) -> torch.Tensor:
        """[T + 1, B, 4 C']: Z_T then one eps per reverse step, seeded with ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        shape = (batch, self.schedule.dim)
        return torch.stack([torch.randn(shape, generator=generator)
                            for _ in range(self.schedule.timesteps + 1)])  # fmt: skip

    @torch.no_grad()
    def z_hat(self, lq: torch.Tensor) -> torch.Tensor:
        noises = self.prior_noise(lq.shape[0]).to(self.device)
        return self.prior.sample(lq, noises, self.schedule)

    def restore(self, lq: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        sr, _ = self.net(lq.to(self.device, torch.float32), z_hat)
        return sr.float().clamp(0, 1)

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        lq = lq.to(self.device, torch.float32)
        return self.restore(lq, self.z_hat(lq))

    @torch.no_grad()
    def tiled(self, lq: torch.Tensor, tile: int, overlap: int, progress=None) -> torch.Tensor:
        """``inference.tiling``'s hook: the tiles share one Z_hat, the prior of the whole image
        (CFE_R pools over the image), so they agree where they overlap."""
        from distsr.inference.tiling import upscale_tiled

        lq = lq.to(self.device, torch.float32)
        z_hat = self.z_hat(lq)
        return upscale_tiled(lambda part: self.restore(part, z_hat), lq, self.scale, tile,
                             overlap, progress=progress)  # fmt: skip


def load_fasrer(weights, student, cfg_path):
    """FASRer of ``student`` (a ``recipes.fkdiff.FASRerStudent``) with ``weights`` strictly."""
    from distsr.models.fkdiff.fasrer import FASRer
    from distsr.teachers.fkdiff import load_parts

    return load_parts(FASRer(student.student), str(weights), f"FASRer student of {cfg_path}")


def fasrer_predictor(weights, student, cfg_path, steps="one", device="cpu", seed=0, sampler=None):
    """The signature of ``inference.predictors.PREDICTORS`` (``steps`` and ``sampler`` do not
    apply: one FASRer pass after the prior's fixed T steps)."""
    from distsr.teachers.fkdiff import load_prior

    net = load_fasrer(weights, student, cfg_path)
    prior = load_prior(student.teacher)
    schedule = PriorSchedule(student.teacher.prior)
    return FASRerPredictor(net.to(device), prior.to(device), schedule, seed)
