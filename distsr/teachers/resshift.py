"""The ResShift teacher (Yue et al., NeurIPS 2023; METHODS.md §1) behind the ``Teacher`` interface.

Latents, the lq condition, the one-step rule and the encoder features are those of
``models.resshift.ResShift``. The default sampler is the deterministic SinSR chain, so a target is
a function of ``(z_y, eps)`` only (METHODS.md §1-2); the stochastic official sampler consumes the
prior eps and one eps per step, drawn one after another from the sample's generator
(``teachers.noise``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from distsr.fingerprint import hash_modules
from distsr.models.resshift import ResShift, ResShiftSpec, build_unet, feature_channels
from distsr.teachers.base import Teacher

SAMPLERS = ("deterministic", "stochastic")


@dataclass
class TeacherConfig(ResShiftSpec):
    """A frozen ResShift teacher: a ``ResShiftSpec`` with trained weights + its sampler."""

    kind: Literal["resshift"] = "resshift"
    sampler: Literal["deterministic", "stochastic"] = "deterministic"

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate()
        if not self.unet_checkpoint:
            problems.append(("unet_checkpoint", "a teacher needs trained UNet weights (a path)"))
        if self.sampler not in SAMPLERS:
            problems.append(("sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}"))
        return problems


class ResShiftTeacher(Teacher):
    """Frozen ResShift UNet + first stage + residual-shifting sampler."""

    kind = "resshift"
    stored = ("z_y",)  # the cache keeps z_y; the UNet condition is recomputed from lq

    def __init__(self, cfg: TeacherConfig, model: ResShift):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.unet, self.diffusion = model.unet, model.diffusion
        self.freeze()
        self._weights_hash: str | None = None

    @property
    def noise_tensors(self) -> int:
        # stochastic: the prior eps, then one eps per step in the official order (README §2)
        return 1 if self.cfg.sampler == "deterministic" else 1 + self.num_timesteps

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    # ---- latents ----------------------------------------------------------------------------
    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        """``{"z_y": E(bicubic_up(lq)), "lq": UNet condition}`` from lq in [0, 1]."""
        z_y = None if stored is None else stored["z_y"].to(self.device, torch.float32)
        return self.model.prepare(lq.to(self.device), z_y)

    def noise_shape(self, cond: dict) -> tuple[int, ...]:
        return tuple(cond["z_y"].shape[1:])

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return self.model.encode_gt(gt.to(self.device))

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z0.to(self.device))

    # ---- diffusion --------------------------------------------------------------------------
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
        z_y, fn = cond["z_y"], self.model.denoise_fn(self.unet, cond)
        if self.cfg.sampler == "deterministic":
            return self.diffusion.sample_deterministic(fn, z_y, self._prior_noise(noise, z_y))
        if noise.dim() != z_y.dim() + 1 or noise.shape[0] != self.noise_tensors:
            raise ValueError(
                f"the stochastic sampler needs noise [{self.noise_tensors}, B, C, H, W] (prior "
                f"eps + one per step; noise_for(..., tensors=teacher.noise_tensors)), got "
                f"{tuple(noise.shape)}"
            )
        noise = noise.to(z_y.device, z_y.dtype)
        return self.diffusion.sample_stochastic(fn, z_y, noise[0], list(noise[1:]))

    def noised(self, z0: torch.Tensor, t, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_t = z0 + eta_t (z_y - z0) + kappa sqrt(eta_t) eps (METHODS.md §1, forward)."""
        return self.diffusion.q_sample(z0, cond["z_y"], t, noise)

    def denoise(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """x0_hat = f(z_t / sqrt(kappa^2 eta_t + 1), t, lq) (METHODS.md §1, network)."""
        return self.diffusion.denoise(self.model.denoise_fn(self.unet, cond), z_t, t)

    def sqrt_snr(self, t, like: torch.Tensor) -> torch.Tensor:
        """(1 - eta_t) / (kappa sqrt(eta_t)): z_t = (1 - eta_t) z0 + eta_t z_y + kappa sqrt(eta_t)
        eps (TAD-SR Eq. 8's w2 / w). eta is picked from the float64 schedule, then cast."""
        t = self.diffusion._timesteps(t, like)
        eta = torch.from_numpy(self.diffusion.etas)[t.cpu()].float().to(like.device)
        eta = eta.view(-1, *([1] * (like.ndim - 1)))
        return (1 - eta) / (eta.sqrt() * self.diffusion.kappa)

    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """Encoder features (TAD-SR discriminator, METHODS.md §2): ``levels`` holds skip indices
        of the UNet's input blocks (official TAD-SR: 3, 6, 9, 11) and/or ``"mid"``."""
        return self.model.features(self.unet, z_t, t, cond, levels)

    def feature_channels(self, levels: Sequence) -> list[int]:
        return feature_channels(self.unet, levels)

    def make_student(self) -> torch.nn.Module:
        return copy.deepcopy(self.unet).requires_grad_(True).train()

    def student_step(self, net, z_T: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model.one_step(net, z_T, cond)

    def partitionable(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.unet}

    # ---- identity ---------------------------------------------------------------------------
    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:  # frozen weights: hash once
            arch = {"unet": self.cfg.unet, "autoencoder": self.cfg.autoencoder.kind}
            modules = [("unet", self.unet), ("autoencoder", self.model.autoencoder)]
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
    return ResShiftTeacher(cfg, ResShift(cfg, unet=build_unet(cfg))).to(device)
