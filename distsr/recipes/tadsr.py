"""TAD-SR: one-step student by time-aware distillation (He et al., paper 002; METHODS.md §2).

Per iteration (Algorithm 1): the student maps z_T = z_y + kappa sqrt(eta_T) eps to z0 in one
step; the teacher's multi-step output from the SAME z_T comes from the teacher cache (or is run
live). The time-aware discriminator is updated first (hinge loss on teacher-encoder features of
noised student and real latents), then the student with
    L = L_distill + lambda1 L_hsd + lambda2 L_adv^G            (paper Eq. 13)
while the discriminator is frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from distsr.losses.adversarial import d_hinge_loss, g_adv_loss
from distsr.losses.hsd import hsd_loss, hsd_noise, sample_hsd_timesteps
from distsr.models.discriminator import (
    OFFICIAL_LEVELS,
    TimeAwareDiscriminator,
    feature_channels_for,
    teacher_features,
)
from distsr.recipes.base import Recipe, Update, frozen
from distsr.teachers.resshift import TeacherConfig, build_teacher
from distsr.teachers.source import CachedTeacher, LiveTeacher, check_cache


@dataclass
class DiscriminatorConfig:
    levels: list[int] = field(default_factory=lambda: list(OFFICIAL_LEVELS))
    include_middle: bool = True
    kwargs: dict = field(default_factory=dict)  # TimeAwareDiscriminator options
    lr: float | None = None  # None: the engine's optimizer lr
    heads: Literal["sum", "concat_mean"] = "sum"  # paper: sum over scales; code: one mean


@dataclass
class TadsrConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache_dir: str | None = None  # cache/<fingerprint> from jobs/cache_teacher.py; None = live
    cache_seed: int = 0  # noise seed of the live teacher (the cache stores its own)
    teacher_partition: Literal["replicate", "zero3"] = "replicate"  # zero3: 1/world per rank
    lambda_hsd: float = 1.0  # lambda1 (real-world SR)
    lambda_adv: float = 0.02  # lambda2
    hsd_max_frac: float = 0.2  # t' ~ U[1, T/5] (paper)
    noise: Literal["gaussian", "uniform"] = "gaussian"  # paper: Gaussian; official code: uniform
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self):
        problems = []
        if self.cache_dir and not Path(self.cache_dir).expanduser().is_dir():
            problems.append(("cache_dir", f"teacher cache not found: {self.cache_dir}"))
        for key in ("lambda_hsd", "lambda_adv"):
            if getattr(self, key) < 0:
                problems.append((key, "must be >= 0"))
        return problems


class TadsrRecipe(Recipe):
    Config = TadsrConfig

    def __init__(self, cfg: TadsrConfig, *, device, dtype=torch.float32):
        super().__init__(cfg, device=device, dtype=dtype)
        self.teacher = build_teacher(cfg.teacher, device)
        self.diffusion = self.teacher.diffusion
        self.student = copy.deepcopy(self.teacher.unet).requires_grad_(True).train()  # init = F
        channels = feature_channels_for(self.teacher.unet, cfg.disc.levels, cfg.disc.include_middle)
        self.disc = TimeAwareDiscriminator(channels, **cfg.disc.kwargs)
        if cfg.cache_dir:
            check_cache(cfg.cache_dir, self.teacher)  # refuses another teacher's outputs
            self.source = CachedTeacher.from_cache(cfg.cache_dir, device=device)
        else:
            self.source = LiveTeacher(self.teacher, cfg.cache_seed)

    def trainable(self):
        return {"disc": self.disc, "student": self.student}

    def ema_targets(self):
        return ["student"]

    def partitioned(self):
        return {"teacher": self.teacher.unet} if self.cfg.teacher_partition == "zero3" else {}

    def optimizer_overrides(self):
        return {"disc": {"lr": self.cfg.disc.lr}} if self.cfg.disc.lr else {}

    def make_loader(self, data_cfg, **kwargs):
        if not self.cfg.cache_dir:
            return super().make_loader(data_cfg, **kwargs)
        from distsr.data.cache import make_joined_loader

        return make_joined_loader(data_cfg, self.cfg.cache_dir, **kwargs)

    def features(self, z0: torch.Tensor, z_y, t, noise, lq) -> list[torch.Tensor]:
        """F_k = Enc_F(q(z0, t), t, y) (Eq. 9), differentiable w.r.t. z0."""
        z_t = self.diffusion.q_sample(z0, z_y, t, noise)
        d = self.cfg.disc
        return teacher_features(self.teacher.unet, self.diffusion.normalize_input(z_t, t), t, lq,
                                d.levels, d.include_middle)  # fmt: skip

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        cfg, T = self.cfg, self.diffusion.num_timesteps
        tgt = self.source.targets(batch)
        z_y, z0_tch, lq = tgt["z_y"], tgt["z0_tch"], tgt["lq_cond"].float()
        # Alg. 1 line 3: one student step from the same z_T as the teacher's trajectory
        z_T = self.diffusion.prior_sample(z_y, tgt["noise"])
        t_last = torch.full((z_y.shape[0],), T - 1, device=z_y.device, dtype=torch.long)
        z_in = self.diffusion.normalize_input(z_T, t_last).to(self.dtype)
        z0_stu = self.nets["student"](z_in, t_last, lq=lq.to(self.dtype)).float()

        # Alg. 1 lines 4-6: discriminator update on noised fake (student) and real latents
        t = torch.randint(0, T, (z_y.shape[0],), device=z_y.device)
        eps = hsd_noise(z_y, cfg.noise)
        with torch.no_grad():
            f_fake = self.features(z0_stu.detach(), z_y, t, eps, lq)
            f_real = self.features(tgt["z_gt"], z_y, t, eps, lq)
        loss_d = d_hinge_loss(self.nets["disc"](f_fake, t), self.nets["disc"](f_real, t),
                              heads=cfg.disc.heads)  # fmt: skip
        yield Update("disc", loss_d)

        # Alg. 1 lines 7-10: generator update with the discriminator frozen (Eq. 13)
        loss_distill = F.mse_loss(z0_stu, z0_tch)  # vanilla distillation
        t_hsd = sample_hsd_timesteps(z_y.shape[0], T, max_frac=cfg.hsd_max_frac, device=z_y.device)
        loss_hsd = hsd_loss(z0_stu, z0_tch, z_y, self.teacher_denoise(lq), self.diffusion,
                            t_hsd, hsd_noise(z_y, cfg.noise))  # fmt: skip
        with frozen(self.disc):
            logits = self.plain("disc")(self.features(z0_stu, z_y, t, eps, lq), t)
            loss_adv = g_adv_loss(logits, heads=cfg.disc.heads)
        loss = loss_distill + cfg.lambda_hsd * loss_hsd + cfg.lambda_adv * loss_adv
        logs = {"distill": loss_distill.item(), "adv_g": loss_adv.item(), "d_loss": loss_d.item()}
        yield Update("student", loss, logs)

    def teacher_denoise(self, lq: torch.Tensor):
        """The frozen teacher (kept in fp32 whatever the engines' precision) with lq bound."""
        return lambda x, t: self.teacher.unet(x.float(), t, lq=lq)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | teacher (T steps) | student (1 step) | gt, for the first 4 samples."""
        batch = first(batch, 4)
        tgt = self.source.targets(batch)
        z_y, lq = tgt["z_y"], tgt["lq_cond"].float()
        z_T = self.diffusion.prior_sample(z_y, tgt["noise"])
        t = torch.full((z_y.shape[0],), self.diffusion.num_timesteps - 1, device=z_y.device)
        z_in = self.diffusion.normalize_input(z_T, t).to(self.dtype)
        z0_stu = self.nets["student"](z_in, t, lq=lq.to(self.dtype)).float()
        decode = self.teacher.decode
        return {"bicubic": decode(z_y), "teacher": decode(tgt["z0_tch"]),
                "student": decode(z0_stu), "gt": decode(tgt["z_gt"])}  # fmt: skip


def first(value, n: int):
    """The first ``n`` samples of a (nested) batch: tensors and lists sliced, the rest kept."""
    if isinstance(value, dict):
        return {k: first(v, n) for k, v in value.items()}
    if isinstance(value, torch.Tensor | list | tuple):
        return value[:n]
    return value
