"""The FKdiff teacher (Chen, paper 000; METHODS.md §5): a restorer conditioned on a compact prior,
and the T-step diffusion that estimates that prior from lq.

    Z     = CFE_D(Down(Concat(gt, lq)))          stage 1 (``fkdiff_pretrain``): restorer + CFE_D, L1
    D     = CFE_R(Down(lq))                      stage 2 (``fkdiff_prior``): CFE_R + the denoiser
    Z_hat = T-step DDPM on the compact vector, from z_T ~ N(0, I), guided by D
    sr    = restorer(lq, Z_hat)

Behind ``Teacher`` the diffusion's target space is the compact prior: ``sample(cond, noise)`` is
Z_hat (``outputs = ("z_hat",)``, a [B, 4 C'] vector), from the T + 1 seeded noise tensors of
``teachers.noise`` (z_T, then one per step), so the teacher cache stores Z_hat per sample and
a cached and a live source give the same prior for the same (seed, key). ``restore(lq, z_hat)``
is the locked restorer: the image and the paired-layer features PHexKD distils (the features
are too large to cache, and the restorer is one forward). ``encode_gt`` keeps gt as the image:
the prior of gt, Z, needs lq too.

The weights come from the two stages' exports: ``restorer_checkpoint`` holds ``restorer.*`` and
``cfe_d.*`` (the stage-1 engine ``restorer``), ``prior_checkpoint`` holds ``cfe_r.*`` and
``denoiser.*`` (the stage-2 engine ``prior``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from distsr.config import missing_file
from distsr.fingerprint import hash_modules
from distsr.models.fkdiff.config import CFEConfig, FKdiffNetConfig, PriorConfig
from distsr.teachers.base import Teacher


@dataclass
class FKdiffTeacherConfig:
    """A locked FKdiff teacher: the trained stage-1 restorer and stage-2 prior diffusion."""

    kind: Literal["fkdiff"] = "fkdiff"
    restorer_checkpoint: str = ""  # fkdiff_pretrain export: export/restorer[_ema].safetensors
    prior_checkpoint: str = ""  # fkdiff_prior export: export/prior[_ema].safetensors
    net: FKdiffNetConfig = field(default_factory=FKdiffNetConfig)
    cfe: CFEConfig = field(default_factory=CFEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    @property
    def scale(self) -> int:
        return self.net.scale

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for key in ("restorer_checkpoint", "prior_checkpoint"):
            if not getattr(self, key):
                problems.append((key, "the teacher needs the trained weights (a path)"))
            problems += missing_file(key, getattr(self, key), "FKdiff weights")
        problems += check_prior_channels(self.net, self.cfe, self.prior)
        return problems


def check_prior_channels(net, cfe: CFEConfig, prior: PriorConfig) -> list[tuple[str, str]]:
    """C' must agree between the restorer (or FASRer), the CFEs and the denoiser."""
    sizes = {"net.prior_channels": net.prior_channels, "cfe.prior_channels": cfe.prior_channels,
             "prior.prior_channels": prior.prior_channels}  # fmt: skip
    if len(set(sizes.values())) == 1:
        return []
    return [("prior_channels", f"C' differs: {sizes}")]


# ---------------------------------------------------------------- the trained modules


class Stage1Nets(nn.Module):
    """Stage 1 as one module (one engine): Z = CFE_D(Down(Concat(gt, lq))), sr = restorer(lq, Z)."""

    def __init__(self, net: FKdiffNetConfig, cfe: CFEConfig):
        super().__init__()
        from distsr.models.fkdiff.cfe import CFE
        from distsr.models.fkdiff.restorer import FKdiffTeacherNet

        self.restorer = FKdiffTeacherNet(net)
        self.cfe_d = CFE("D", cfe, scale=net.scale, in_channels=net.in_channels)

    def forward(self, lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        z = self.cfe_d(lq, gt)  # Z = CFE_D(Down(Concat(gt, lq)))
        sr, _ = self.restorer(lq, z)  # I_HR = Teacher(I_LQ, Z)
        return sr


class PriorNets(nn.Module):
    """Stage 2's trained parts as one module (one engine): CFE_R and the prior denoiser."""

    entry_points = ("sample",)  # called on the engine's module too (engine/precision.py)

    def __init__(self, cfe: CFEConfig, prior: PriorConfig, in_channels: int = 3):
        super().__init__()
        from distsr.models.fkdiff.cfe import CFE
        from distsr.models.fkdiff.prior import PriorDenoiser

        self.cfe_r = CFE("R", cfe, in_channels=in_channels)
        self.denoiser = PriorDenoiser(prior)

    def forward(self, lq, z0, t, noise, schedule) -> torch.Tensor:
        """The diffusion loss of the denoiser at steps ``t``, guided by D = CFE_R(lq)."""
        return schedule.loss(self.denoiser, z0, self.cfe_r(lq), t, noise)

    def sample(self, lq: torch.Tensor, noises, schedule) -> torch.Tensor:
        """Z_hat from the T + 1 noise tensors (z_T first), guided by D = CFE_R(lq)."""
        return schedule.sample(self.denoiser, self.cfe_r(lq), list(noises))


def load_parts(module: nn.Module, path: str, what: str) -> nn.Module:
    """Strictly load an export into ``module`` (its keys carry the module's child names)."""
    from distsr.models.checkpoint import check_state_dict, read_checkpoint

    state = read_checkpoint(path)
    report = check_state_dict(module, state)
    if report:
        raise ValueError(f"{path} does not fit the configured {what}:{report}")
    module.load_state_dict(state)
    return module


def load_prior(cfg: FKdiffTeacherConfig) -> PriorNets:
    prior = PriorNets(cfg.cfe, cfg.prior, cfg.net.in_channels)
    return load_parts(prior, cfg.prior_checkpoint, "FKdiff prior (teacher.cfe, teacher.prior)")


def load_stage1(cfg: FKdiffTeacherConfig) -> Stage1Nets:
    stage1 = Stage1Nets(cfg.net, cfg.cfe)
    return load_parts(stage1, cfg.restorer_checkpoint, "FKdiff restorer (teacher.net, .cfe)")


# ---------------------------------------------------------------- the teacher


class FKdiffTeacher(Teacher):
    """Locked restorer + CFE_R + prior denoiser; ``sample`` gives Z_hat, ``restore`` the image."""

    kind = "fkdiff"
    outputs = ("z_hat",)

    def __init__(self, cfg: FKdiffTeacherConfig, restorer: nn.Module, prior: PriorNets):
        from distsr.models.fkdiff.prior import PriorSchedule

        super().__init__()
        self.cfg = cfg
        self.restorer, self.prior_nets = restorer, prior
        self.schedule = PriorSchedule(cfg.prior)
        self.freeze()
        self._weights_hash: str | None = None

    @property
    def noise_tensors(self) -> int:
        return self.cfg.prior.timesteps + 1  # z_T, then one eps per reverse step

    @property
    def num_timesteps(self) -> int:
        return self.cfg.prior.timesteps

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        return {"lq": lq.to(self.device, torch.float32)}  # D is computed where it is used

    def guide(self, cond: dict) -> torch.Tensor:
        return self.prior_nets.cfe_r(cond["lq"])  # D = CFE_R(Down(lq))

    def noise_shape(self, cond: dict) -> tuple[int, ...]:
        return (4 * self.cfg.prior.prior_channels,)  # Z_hat: 4 C' entries

    def prior(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        return noise[0]  # z_T ~ N(0, I)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """Z_hat by the T reverse steps from z_T = noise[0] (noise: [T + 1, B, 4 C'])."""
        noises = [n.to(self.device, torch.float32) for n in noise]
        return self.schedule.sample(self.prior_nets.denoiser, self.guide(cond), noises).float()

    def noised(self, z0, t, cond, noise):
        return self.schedule.q_sample(z0, t, noise)  # q(Z_t | Z)

    def denoise(self, z_t, t, cond):
        return self.prior_nets.denoiser(z_t, self.guide(cond), t)

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, z_hat: torch.Tensor):
        """(sr in [0, 1] range convention, the restorer's 4 paired-layer features) of the locked
        restorer for ``lq`` and the prior ``z_hat``; no gradient reaches the teacher."""
        lq = lq.to(self.device, torch.float32)
        sr, feats = self.restorer(lq, z_hat.to(self.device, torch.float32))
        return sr.float(), [f.float() for f in feats]

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return gt.to(self.device, torch.float32)  # the image: Z = CFE_D(gt, lq) needs lq too

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        raise ValueError("an FKdiff prior Z_hat is not an image: restore(lq, z_hat) gives one")

    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:
            named = [("restorer", self.restorer), ("prior", self.prior_nets)]
            extra = {"net": vars(self.cfg.net), "cfe": vars(self.cfg.cfe)}
            self._weights_hash = hash_modules(named, extra=extra)
        return {"kind": self.kind, "weights": self._weights_hash,
                "prior": dict(vars(self.cfg.prior)), "scale": self.cfg.scale}  # fmt: skip


def build_fkdiff_teacher(cfg: FKdiffTeacherConfig, device="cpu") -> FKdiffTeacher:
    """The locked teacher from the two stages' exports (strict loading, keys named on mismatch)."""
    restorer = load_stage1(cfg).restorer  # CFE_D stays behind: Z_hat replaces Z
    return FKdiffTeacher(cfg, restorer, load_prior(cfg)).to(device)
