"""High-frequency enhanced score distillation (HSD) of TAD-SR (paper 002, METHODS.md §2).

Both one-step outputs are noised to a SMALL step t' with the SAME noise, the frozen teacher F
predicts x0 from each, and the student output is pushed along

    g = w2 * (z0_stu - z0_tch + F(z_t'^tch, t') - F(z_t'^stu, t')),
    w2 = w * (1 - eta_t') / (sqrt(eta_t') * kappa),   w = 1 / (C * S)        (paper Eq. 8)

which is w * (eps_phi(z_t'^stu) - eps_phi(z_t'^tch)) written in x0 form (paper Eq. 7 and
appendix A1, eps_phi(z_t) = (z_t - F - eta_t (z_y - F)) / (sqrt(eta_t) kappa)), with the U-Net
Jacobian omitted as in SDS. The training loss is the surrogate ``sum(g.detach() * z0_stu)``.

Timesteps are distsr's 0-based indices (``ResShiftDiffusion``): index i is the paper's t = i + 1.
Facts of the official code (LearningHx/TAD-SR, ``training_losses_distill``): t' =
``randint(0, 3)`` i.e. {0, 1, 2} = the paper's [1, 3] for T = 15; noise ``rand_like``
(uniform [0, 1)) although the paper says Gaussian; the surrogate is ``mean_flat(g_eps * z0_stu)``
(w = 1/(C*S) folded into the mean) averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "hsd_gradient",
    "hsd_gradient_snr",
    "hsd_loss",
    "hsd_noise",
    "hsd_timestep_count",
    "sample_hsd_timesteps",
]

NoiseKind = Literal["gaussian", "uniform"]
Reduction = Literal["mean", "sum", "none"]


def _per_sample(value, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or a [B] tensor as float32 [B, 1, ...] on ``like``'s device."""
    v = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if v.dim() == 0:
        v = v.expand(like.shape[0])
    if v.shape != (like.shape[0],):
        raise ValueError(f"{name} must be a number or of shape [{like.shape[0]}], got {v.shape}")
    return v.view(-1, *([1] * (like.ndim - 1)))


def hsd_gradient(
    z0_stu: torch.Tensor,
    z0_tch: torch.Tensor,
    x0_tch_noised: torch.Tensor,
    x0_stu_noised: torch.Tensor,
    eta_t,
    kappa: float,
    w=None,
) -> torch.Tensor:
    """g = w2 (z0_stu - z0_tch + F(z_t'^tch) - F(z_t'^stu)) (paper Eq. 8, METHODS.md §2).

    ``x0_tch_noised`` / ``x0_stu_noised`` are the teacher's x0 predictions from the noised
    teacher / student outputs. ``eta_t`` is eta at t' (a float or per-sample [B]); ``w``
    defaults to 1 / (C * S) (C channels, S spatial positions), also a float or [B].
    """
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa!r}")
    eta = _per_sample(eta_t, z0_stu, "eta_t")
    if not bool(((eta > 0) & (eta <= 1)).all()):
        raise ValueError(f"eta_t must lie in (0, 1], got {eta.flatten().tolist()}")
    ratio = (1 - eta) / (eta.sqrt() * kappa)  # ResShift's sqrt(SNR) at t'
    return hsd_gradient_snr(z0_stu, z0_tch, x0_tch_noised, x0_stu_noised, ratio, w)


def hsd_gradient_snr(z0_stu, z0_tch, x0_tch_noised, x0_stu_noised, sqrt_snr, w=None):
    """g = w sqrt_snr (z0_stu - z0_tch + F(z_t'^tch) - F(z_t'^stu)) for any diffusion with
    z_t = a_t z0 + ... + sigma_t eps (sqrt_snr = a_t / sigma_t; ResShift: (1 - eta) /
    (kappa sqrt(eta)), paper Eq. 8). ``sqrt_snr`` and ``w`` are floats or per-sample."""
    shapes = {tuple(x.shape) for x in (z0_stu, z0_tch, x0_tch_noised, x0_stu_noised)}
    if len(shapes) != 1:
        raise ValueError(f"HSD inputs must share one shape, got {sorted(shapes)}")
    if z0_stu.ndim < 2:
        raise ValueError(f"HSD inputs must be [B, C, ...], got shape {tuple(z0_stu.shape)}")
    if w is None:
        w = 1.0 / z0_stu[0].numel()  # 1 / (C * S)
    snr = sqrt_snr.reshape(-1) if isinstance(sqrt_snr, torch.Tensor) else sqrt_snr
    w2 = _per_sample(w, z0_stu, "w") * _per_sample(snr, z0_stu, "sqrt_snr")
    return w2 * (z0_stu - z0_tch + x0_tch_noised - x0_stu_noised)


def hsd_loss(
    z0_stu: torch.Tensor,
    z0_tch: torch.Tensor,
    teacher,
    cond: dict,
    t,
    noise: torch.Tensor,
    w=None,
    reduction: Reduction = "mean",
    return_grad: bool = False,
):
    """The HSD surrogate whose gradient w.r.t. ``z0_stu`` is g (METHODS.md §2).

    z_t'^stu = q(z0_stu.detach()), z_t'^tch = q(z0_tch) with the SAME ``noise`` at ``t``
    (0-based, int or [B]), through the frozen ``teacher``'s ``noised`` / ``denoise`` /
    ``sqrt_snr`` (any diffusion ``Teacher``) under ``no_grad``. Per sample the surrogate is
    ``sum(g.detach() * z0_stu)``; ``reduction``: ``"mean"`` over the batch (default, the
    official ``.mean()``: d/dz0_stu = g / B), ``"sum"`` (d/dz0_stu = g exactly) or ``"none"``
    ([B]). With ``return_grad`` it returns ``(loss, g)``. Its value is not a distance; log ``g``
    (e.g. its norm) instead.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if z0_tch.shape != z0_stu.shape:
        raise ValueError(f"z0_tch {tuple(z0_tch.shape)} and z0_stu {tuple(z0_stu.shape)} differ")
    with torch.no_grad():
        z0_stu_d = z0_stu.detach().float()
        x0_stu = teacher.denoise(teacher.noised(z0_stu_d, t, cond, noise), t, cond)
        x0_tch = teacher.denoise(teacher.noised(z0_tch, t, cond, noise), t, cond)
        parts = (x.float() for x in (z0_stu_d, z0_tch, x0_tch, x0_stu))  # bf16-safe difference
        g = hsd_gradient_snr(*parts, teacher.sqrt_snr(t, z0_stu_d), w).to(z0_stu.dtype)
    per_sample = (g * z0_stu).flatten(1).sum(dim=1)
    if reduction == "mean":
        loss = per_sample.mean()
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample
    return (loss, g) if return_grad else loss


def hsd_timestep_count(num_timesteps: int, max_frac: float = 0.2) -> int:
    """How many small steps HSD draws from: floor(T * max_frac), at least 1 (T = 15 -> 3)."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if not 0 < max_frac <= 1:
        raise ValueError(f"max_frac must lie in (0, 1], got {max_frac!r}")
    return max(1, math.floor(num_timesteps * max_frac + 1e-9))


def sample_hsd_timesteps(
    batch: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    max_frac: float = 0.2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """t' uniform over the 0-based indices {0, ..., n-1}, n = floor(T * max_frac) (at least 1).

    The paper draws t' uniformly in [1, T/5] = [1, 3] for T = 15 (1-based, Algorithm 1:
    U(0, T/5)); distsr's index i is the paper's t = i + 1, so that is {0, 1, 2}, which is also
    exactly the official ``randint(0, 3)``. T = 4 (journal v3) gives {0}. Returns LongTensor [B].
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an integer >= 0, got {batch!r}")
    n = hsd_timestep_count(num_timesteps, max_frac)
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, n, (batch,), generator=generator, device=gen_device)
    return t if device is None else t.to(device)


def hsd_noise(
    like: torch.Tensor, kind: NoiseKind = "gaussian", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The HSD perturbation: ``"gaussian"`` N(0, I) (paper, Algorithm 1) or ``"uniform"``
    U[0, 1) (the official code's ``rand_like``; note it is not zero-mean)."""
    if kind == "gaussian":
        draw = torch.randn
    elif kind == "uniform":
        draw = torch.rand
    else:
        raise ValueError(f"kind must be 'gaussian' or 'uniform', got {kind!r}")
    if generator is not None and generator.device != like.device:
        out = draw(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
        return out.to(like.device)
    return draw(like.shape, generator=generator, dtype=like.dtype, device=like.device)
