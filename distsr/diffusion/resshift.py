"""ResShift residual-shifting diffusion (Yue et al., NeurIPS 2023) and its samplers.

Equations: METHODS.md §1. Facts of the official code (zsyOAOA/ResShift): conformance/resshift
README §2, cited as "README §2". Timesteps are the official indices t = 0..T-1 (METHODS.md counts
1..T; its t is our t + 1). Coefficient arrays are float64 numpy; each use indexes them and casts
the picked values to float32, the order the official ``_extract_into_tensor`` uses, so float32
runs reproduce the official numbers bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from distsr.diffusion.schedule import (
    REALSR_V1,
    REALSR_V3,
    ScheduleConfig,
    exponential_sqrt_etas,
)

__all__ = [
    "REALSR_V1",
    "REALSR_V3",
    "DenoiseFn",
    "ResShiftDiffusion",
    "ScheduleConfig",
    "exponential_sqrt_etas",
]

# denoise_fn(model_input, t) -> x0_hat: the UNet call with lq bound by the caller
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Timesteps = int | torch.Tensor


class ResShiftDiffusion:
    """Forward process, posterior and samplers of ResShift (README §2, METHODS.md §1).

    ``t`` is everywhere an int or a LongTensor of per-sample steps ([] or [B]); coefficients are
    broadcast over [B, 1, 1, 1]. Stateless apart from the float64 schedule arrays below.
    """

    def __init__(self, cfg: ScheduleConfig | None = None):
        cfg = cfg if cfg is not None else ScheduleConfig()
        problems = cfg.validate()
        if problems:
            lines = "; ".join(f"{key}: {msg}" for key, msg in problems)
            raise ValueError(f"invalid ResShift schedule config: {lines}")
        self.cfg = cfg
        self.kappa = float(cfg.kappa)
        self.num_timesteps = cfg.steps
        # float64 schedule, README §2
        self.sqrt_etas = exponential_sqrt_etas(cfg)
        self.etas = self.sqrt_etas**2
        self.etas_prev = np.append(0.0, self.etas[:-1])
        self.alphas = self.etas - self.etas_prev
        self.kappa_sqrt_etas = self.kappa * self.sqrt_etas
        # posterior q(z_{t-1} | z_t, z0): mean = c1 z_t + c2 z0,
        # var = kappa^2 eta_{t-1} alpha_t / eta_t (README §2)
        self.posterior_variance = self.kappa**2 * self.etas_prev / self.etas * self.alphas
        # var is 0 at t = 0, so its log is clipped to the t = 1 value; it is never used (no noise
        # at t = 0). T = 1 has no t = 1: the forward variance kappa^2 eta_0 stands in.
        T = self.num_timesteps
        head = self.posterior_variance[1] if T > 1 else self.kappa**2 * self.etas[0]
        self.posterior_variance_clipped = np.append(head, self.posterior_variance[1:])
        self.posterior_log_variance_clipped = np.log(self.posterior_variance_clipped)
        self.posterior_mean_coef1 = self.etas_prev / self.etas
        self.posterior_mean_coef2 = self.alphas / self.etas
        # SinSR deterministic step: noise part scales by sqrt(eta_{t-1} / eta_t) (METHODS.md §1)
        self.ddim_noise_coef = np.sqrt(self.etas_prev / self.etas)

    # ---- indexing helpers -------------------------------------------------------------------
    def _timesteps(self, t: Timesteps, x: torch.Tensor) -> torch.Tensor:
        """Check ``t`` and return it as a LongTensor [B] on ``x``'s device."""
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"timesteps must be integer step indices, got dtype {t.dtype}")
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be an int or of shape [{x.shape[0]}], got {t.shape}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in 0..{self.num_timesteps - 1}, got {t.tolist()}")
        return t

    @staticmethod
    def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] as float32 [B, 1, ...]: index the float64 values, then cast (README §2)."""
        out = torch.from_numpy(arr)[t.cpu()].float().to(t.device)
        return out.view(-1, *([1] * (ndim - 1)))

    def _noise(self, like: torch.Tensor, noise, generator) -> torch.Tensor:
        if noise is None:
            return torch.randn(
                like.shape, generator=generator, dtype=like.dtype, device=like.device
            )
        if noise.shape != like.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
        return noise

    # ---- forward process --------------------------------------------------------------------
    def q_sample(
        self,
        z0: torch.Tensor,
        z_y: torch.Tensor,
        t: Timesteps,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z_t = z0 + eta_t (z_y - z0) + kappa sqrt(eta_t) eps (METHODS.md §1, forward)."""
        if z_y.shape != z0.shape:
            raise ValueError(f"z_y {tuple(z_y.shape)} and z0 {tuple(z0.shape)} differ in shape")
        t = self._timesteps(t, z0)
        noise = self._noise(z0, noise, generator)
        eta = self._extract(self.etas, t, z0.ndim)
        return eta * (z_y - z0) + z0 + self._extract(self.kappa_sqrt_etas, t, z0.ndim) * noise

    def prior_sample(
        self,
        z_y: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z_{T-1} = z_y + kappa sqrt(eta_{T-1}) eps (README §2: z_y + 1.98 eps)."""
        noise = self._noise(z_y, noise, generator)
        t = self._timesteps(self.num_timesteps - 1, z_y)
        return z_y + self._extract(self.kappa_sqrt_etas, t, z_y.ndim) * noise

    def input_std(self, t: Timesteps, z_t: torch.Tensor) -> torch.Tensor:
        """sqrt(kappa^2 eta_t + 1) in float32, shape [B, 1, ...] (README §2, normalize_input)."""
        t = self._timesteps(t, z_t)
        return torch.sqrt(self._extract(self.etas, t, z_t.ndim) * self.kappa**2 + 1)

    def normalize_input(self, z_t: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """The UNet input z_t / sqrt(kappa^2 eta_t + 1) (METHODS.md §1, "normalize_input")."""
        return z_t / self.input_std(t, z_t)

    # ---- reverse process --------------------------------------------------------------------
    def posterior_mean_variance(
        self, z_t: torch.Tensor, x0_hat: torch.Tensor, t: Timesteps
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, clipped log-variance) of q(z_{t-1} | z_t, x0_hat) (METHODS.md §1)."""
        if x0_hat.shape != z_t.shape:
            raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and z_t {tuple(z_t.shape)} differ")
        t = self._timesteps(t, z_t)
        n = z_t.ndim
        mean = (
            self._extract(self.posterior_mean_coef1, t, n) * z_t
            + self._extract(self.posterior_mean_coef2, t, n) * x0_hat
        )
        variance = self._extract(self.posterior_variance, t, n)
        return mean, variance, self._extract(self.posterior_log_variance_clipped, t, n)

    def _predict(self, denoise_fn: DenoiseFn, z_t: torch.Tensor, t: torch.Tensor):
        model_input = self.normalize_input(z_t, t)
        x0_hat = denoise_fn(model_input, t)
        if x0_hat.shape != z_t.shape:
            raise ValueError(
                f"denoise_fn returned shape {tuple(x0_hat.shape)}, expected {tuple(z_t.shape)}"
            )
        return model_input, x0_hat

    def denoise(self, denoise_fn: DenoiseFn, z_t: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """One network call: x0_hat = f(z_t / sqrt(kappa^2 eta_t + 1), t)."""
        return self._predict(denoise_fn, z_t, self._timesteps(t, z_t))[1]

    def p_sample(
        self,
        denoise_fn: DenoiseFn,
        z_t: torch.Tensor,
        t: Timesteps,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One official step: z_{t-1} = mean + 1[t != 0] exp(logvar_clipped / 2) eps (README §2).
        Noise is drawn (or taken) at t = 0 too and multiplied by 0, as the official loop does."""
        t = self._timesteps(t, z_t)
        model_input, pred_x0 = self._predict(denoise_fn, z_t, t)
        mean, _, log_variance = self.posterior_mean_variance(z_t, pred_x0, t)
        noise = self._noise(z_t, noise, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (z_t.ndim - 1)))
        sample = mean + nonzero * torch.exp(0.5 * log_variance) * noise
        return {"sample": sample, "mean": mean, "pred_x0": pred_x0, "model_input": model_input}

    @torch.no_grad()
    def sample_stochastic_progressive(
        self,
        denoise_fn: DenoiseFn,
        z_y: torch.Tensor,
        noise_prior: torch.Tensor | None = None,
        step_noises: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Iterator[dict]:
        """The official loop, t = T-1..0, yielding each ``p_sample`` dict plus ``"t"``.
        ``step_noises[k]`` is eps of the k-th call (t = T-1-k); ``None`` draws fresh noise in
        the official order (prior first, then one draw per step) from ``generator``."""
        if step_noises is not None and len(step_noises) != self.num_timesteps:
            raise ValueError(
                f"step_noises must hold {self.num_timesteps} tensors (one per step), "
                f"got {len(step_noises)}"
            )
        z = self.prior_sample(z_y, noise_prior, generator)
        for k, t in enumerate(self._reverse_indices(progress)):
            noise = None if step_noises is None else step_noises[k]
            out = self.p_sample(denoise_fn, z, t, noise, generator)
            yield {"t": t, **out}
            z = out["sample"]

    def sample_stochastic(
        self,
        denoise_fn: DenoiseFn,
        z_y: torch.Tensor,
        noise_prior: torch.Tensor | None = None,
        step_noises: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """z0 of the official stochastic sampler (``p_sample_loop``, README §2)."""
        z = None
        for out in self.sample_stochastic_progressive(
            denoise_fn, z_y, noise_prior, step_noises, generator, progress
        ):
            z = out["sample"]
        return z

    def deterministic_step(
        self, denoise_fn: DenoiseFn, z_t: torch.Tensor, z_y: torch.Tensor, t: Timesteps
    ) -> dict[str, torch.Tensor]:
        """SinSR step (METHODS.md §1): with r = z_y - x0_hat,
        z_{t-1} = x0_hat + eta_{t-1} r + sqrt(eta_{t-1} / eta_t) (z_t - x0_hat - eta_t r).
        At t = 0 (eta_{t-1} = 0) it returns x0_hat exactly."""
        if z_y.shape != z_t.shape:
            raise ValueError(f"z_y {tuple(z_y.shape)} and z_t {tuple(z_t.shape)} differ in shape")
        t = self._timesteps(t, z_t)
        model_input, x0_hat = self._predict(denoise_fn, z_t, t)
        n = z_t.ndim
        r = z_y - x0_hat
        eps_part = z_t - x0_hat - self._extract(self.etas, t, n) * r  # = kappa sqrt(eta_t) eps
        sample = (
            x0_hat
            + self._extract(self.etas_prev, t, n) * r
            + self._extract(self.ddim_noise_coef, t, n) * eps_part
        )
        return {"sample": sample, "pred_x0": x0_hat, "model_input": model_input}

    @torch.no_grad()
    def sample_deterministic(
        self,
        denoise_fn: DenoiseFn,
        z_y: torch.Tensor,
        noise_prior: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """z0 of the deterministic (SinSR) chain from z_{T-1} = z_y + kappa sqrt(eta_{T-1}) eps:
        the only randomness is ``noise_prior``, so the result is a function of (z_y, eps)."""
        z = self.prior_sample(z_y, noise_prior, generator)
        for t in self._reverse_indices(progress):
            z = self.deterministic_step(denoise_fn, z, z_y, t)["sample"]
        return z

    def _reverse_indices(self, progress: bool) -> Iterator[int]:
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            return iter(tqdm(indices, desc="resshift"))
        return iter(indices)

    # ---- training ---------------------------------------------------------------------------
    def training_loss(
        self,
        denoise_fn: DenoiseFn,
        z0: torch.Tensor,
        z_y: torch.Tensor,
        t: Timesteps,
        noise: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> torch.Tensor:
        """ResShift objective (x0 prediction, plain MSE): || f(z_t / sqrt(kappa^2 eta_t + 1), t)
        - z0 ||^2 with z_t ~ q(z_t | z0, z_y); per-sample means for ``"none"`` (official
        ``mean_flat``), their batch mean for ``"mean"``. Draw t uniformly in 0..T-1."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        z_t = self.q_sample(z0, z_y, t, noise)
        x0_hat = self.denoise(denoise_fn, z_t, t)
        mse = ((z0 - x0_hat) ** 2).mean(dim=tuple(range(1, z0.ndim)))
        return mse.mean() if reduction == "mean" else mse
