"""Diffusion on the compact prior vector (paper 000, Sec. 3.1; DiffIR's stage-2 diffusion).

Forward (the paper's q):  Z_t = sqrt(abar_t) Z + sqrt(1 - abar_t) eps,   t = 1 .. T (T = 4)
Reverse: the light denoiser estimates Z_hat = f(Z_t, D, t) from the guide D = CFE_R(lq), and
    Z_{t-1} = mu_t(Z_t, Z_hat) + sigma_t eps_t,
    mu_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) Z_hat
           + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) Z_t
(the DDPM posterior mean; the same as the paper's eps form with eps = (Z_t - sqrt(abar_t) Z_hat) /
sqrt(1 - abar_t)), sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t as the paper states.

Code indices ``t`` are 0 .. T-1 (index t is step t + 1). Betas: LDM's "linear" rule, linspace of
sqrt(beta_start) .. sqrt(beta_end), squared (DiffIR: 0.1 .. 0.99, T = 4).
The denoiser (DiffIR's): ``Linear(concat(D, t / (10 T), Z_t))`` + LeakyReLU, then ``depth``
Linear + LeakyReLU layers of width ``width`` (a last Linear maps back if width != 4 C').

Sampling is a function of seeded noise: ``sample(denoiser, d, noises)`` takes T + 1 tensors
(Z_T, then one eps per step; the last step has sigma = 0), e.g.
``distsr.teachers.noise.noise_for(keys, (4 C',), seed, tensors=T + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.fkdiff.config import PriorConfig


def _lrelu() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class PriorDenoiser(nn.Module):
    """``forward(z_t, d, t) -> z0_hat``: z_t, d (B, 4 C'); t (B,) int indices 0 .. T-1 or an int."""

    def __init__(self, cfg: PriorConfig | None = None):
        super().__init__()
        cfg = cfg or PriorConfig()
        n = 4 * cfg.prior_channels
        self.timesteps = cfg.timesteps
        layers = [nn.Linear(2 * n + 1, cfg.width), _lrelu()]
        for _ in range(cfg.depth):
            layers += [nn.Linear(cfg.width, cfg.width), _lrelu()]
        if cfg.width != n:
            layers += [nn.Linear(cfg.width, n), _lrelu()]
        self.mlp = nn.Sequential(*layers)

    def forward(self, z_t: torch.Tensor, d: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=z_t.device).to(z_t.dtype).reshape(-1, 1)
        t = t.expand(z_t.shape[0], 1) / (10 * self.timesteps)
        return self.mlp(torch.cat([d, t, z_t], dim=1))


class PriorSchedule:
    """The T-step schedule: ``q_sample``, the training ``loss`` and the seeded ``sample`` loop."""

    def __init__(self, cfg: PriorConfig | None = None):
        cfg = cfg or PriorConfig()
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        self.dim = 4 * cfg.prior_channels
        sqrt_b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.timesteps,
                                dtype=torch.float64)  # fmt: skip
        self.betas = sqrt_b**2
        self.alphas = 1.0 - self.betas
        self.abar = torch.cumprod(self.alphas, dim=0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        one_minus = 1.0 - self.abar
        self.coef_z0 = self.abar_prev.sqrt() * self.betas / one_minus
        self.coef_zt = self.alphas.sqrt() * (1.0 - self.abar_prev) / one_minus
        self.sigma = ((1.0 - self.abar_prev) / one_minus * self.betas).sqrt()

    def _at(self, table: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).cpu().long()
        if t.numel() and (t.min() < 0 or t.max() >= self.timesteps):
            raise ValueError(f"t must be in 0 .. {self.timesteps - 1}, got {t.tolist()}")
        return table[t].to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor):
        """Z_t = sqrt(abar_t) Z + sqrt(1 - abar_t) eps."""
        a, s = self._at(self.abar.sqrt(), t, z0), self._at((1 - self.abar).sqrt(), t, z0)
        return a * z0 + s * noise

    def loss(
        self,
        denoiser: nn.Module,
        z0: torch.Tensor,
        d: torch.Tensor,
        t: torch.Tensor | int,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """The paper's objective ||eps - eps_theta(Z_t, t)||^2 with eps_theta read from the
        denoiser's Z_hat: eps_theta = (Z_t - sqrt(abar_t) Z_hat) / sqrt(1 - abar_t)."""
        z_t = self.q_sample(z0, t, noise)
        z0_hat = denoiser(z_t, d, t)
        eps_hat = (z_t - self._at(self.abar.sqrt(), t, z0) * z0_hat) / self._at(
            (1 - self.abar).sqrt(), t, z0
        )
        return F.mse_loss(eps_hat, noise)

    def step(
        self, denoiser: nn.Module, z_t: torch.Tensor, d: torch.Tensor, t: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """One reverse step Z_t -> Z_{t-1} (index t)."""
        z0_hat = denoiser(z_t, d, t)
        mean = self._at(self.coef_z0, t, z_t) * z0_hat + self._at(self.coef_zt, t, z_t) * z_t
        return mean + self._at(self.sigma, t, z_t) * noise

    def sample(
        self, denoiser: nn.Module, d: torch.Tensor, noises: Sequence[torch.Tensor] | torch.Tensor
    ) -> torch.Tensor:
        """Z_hat from Z_T = noises[0] through T reverse steps (noises[1:] are the step noises).
        Differentiable (call under ``torch.no_grad()`` when not training through it)."""
        if len(noises) != self.timesteps + 1:
            raise ValueError(f"need T + 1 = {self.timesteps + 1} noise tensors, got {len(noises)}")
        z = noises[0].to(d)
        for i, t in enumerate(reversed(range(self.timesteps))):
            z = self.step(denoiser, z, d, t, noises[i + 1].to(d))
        return z
