"""TAD-SR: one-step student by time-aware distillation (He et al., paper 002; METHODS.md §2).

Per iteration (Algorithm 1): the student maps z_T = z_y + kappa sqrt(eta_T) eps to z0 in one
step; the teacher's multi-step output from the SAME z_T comes from the teacher cache (or is run
live). The time-aware discriminator is updated first (hinge loss on teacher-encoder features of
noised student and real latents), then the student with
    L = L_distill + lambda1 L_hsd + lambda2 L_adv^G            (paper Eq. 13)
while the discriminator is frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from distsr.config import missing_dir
from distsr.data.cache import TeacherCache
from distsr.losses.adversarial import d_hinge_loss, g_adv_loss
from distsr.losses.hsd import hsd_loss, hsd_noise, sample_hsd_timesteps
from distsr.models.discriminator import TimeAwareDiscriminator
from distsr.models.resshift import MIDDLE, OFFICIAL_LEVELS
from distsr.recipes.base import Recipe, Update, frozen
from distsr.registry import build_teacher
from distsr.teachers.resshift import TeacherConfig
from distsr.teachers.seesr_config import SeeSRTeacherConfig
from distsr.teachers.source import CachedTeacher, LiveTeacher


@dataclass
class DiscriminatorConfig:
    levels: list[int] = field(default_factory=lambda: list(OFFICIAL_LEVELS))
    include_middle: bool = True
    # TimeAwareDiscriminator options; the official head: discriminator.OFFICIAL_DISC_KWARGS
    kwargs: dict = field(default_factory=dict)
    lr: float | None = None  # None: the engine's optimizer lr (official: the student's base lr)
    # "engine": the engine's LR schedule, warm-up included, as the student; "constant": the base
    # lr from the first step, never warmed up nor decayed (official: its lr is never adjusted)
    lr_schedule: Literal["engine", "constant"] = "engine"
    # max gradient norm of the discriminator's engine; None (or 0): no clipping. The official
    # TAD-SeeSR code (LearningHx/TAD-SR TAD-SeeSR/train_tadsr.py) clips the generator only:
    # accelerator.clip_grad_norm_ on controlnet_stu + unet_stu, optimizer_D.step() unclipped.
    # engine.grad_clip applies to the student.
    grad_clip: float | None = None
    # how the heads combine (losses/adversarial.py): "sum" Eq. 11-12; "mean" the paper's text
    # (average of the heads); "concat_mean" the official code (one mean over all heads' logits)
    heads: Literal["sum", "mean", "concat_mean"] = "sum"
    # t ~ U{0..T-1} (Alg. 1 line 15); false: U{0..T-2}, never the last step (official code)
    include_last_t: bool = True
    # [start, stop, step]: t uniform over range(start, stop, step) instead (TAD-SeeSR code:
    # [20, 900, 20]); null: the rule above
    timesteps: list[int] | None = None
    # true: noise z0_stu and z0 with the eps of z_T (Alg. 1 lines 16/18 reuse line 6's eps);
    # false: a fresh draw of kind ``noise`` per step (official code: fresh uniform noise)
    reuse_prior_noise: bool = False

    def validate(self):
        problems = timestep_range_problems("timesteps", self.timesteps)
        if self.lr is not None and self.lr <= 0:
            problems.append(("lr", f"must be > 0 (or null: the engine's lr), got {self.lr}"))
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append(
                ("grad_clip", f"must be >= 0 (or null: no clipping), got {self.grad_clip}")
            )
        return problems


@dataclass
class TadsrConfig:
    # the teacher's ``kind`` selects its config: resshift (default) or seesr
    teacher: TeacherConfig | SeeSRTeacherConfig = field(default_factory=TeacherConfig)
    cache_dir: str | None = None  # cache/<fingerprint> from jobs/cache_teacher.py; None = live
    cache_seed: int = 0  # noise seed of the live teacher (the cache stores its own)
    # live teacher: a fresh z_T every step (paper Alg. 1); false: the per-key seeded noise
    fresh_noise: bool = True
    teacher_partition: Literal["replicate", "zero3"] = "replicate"  # zero3: 1/world per rank
    lambda_distill: float = 1.0  # weight of L_distill (TAD-SeeSR code: mse_weight 0.2)
    lambda_hsd: float = 1.0  # lambda1 (real-world SR)
    lambda_adv: float = 0.02  # lambda2
    hsd_max_frac: float = 0.2  # t' ~ U[1, T/5] (paper)
    # [start, stop, step]: t' uniform over range(start, stop, step) instead of hsd_max_frac
    # (TAD-SeeSR code: [20, 900, 20])
    hsd_timesteps: list[int] | None = None
    # the HSD and discriminator perturbations (z_T stays Gaussian): "gaussian" N(0, I) (paper
    # Alg. 1 lines 6, 25); "uniform" U[0, 1) (official code: rand_like for both)
    noise: Literal["gaussian", "uniform"] = "gaussian"
    # the training text (student, discriminator features, HSD) is the empty prompt with this
    # probability, drawn per sample and step from the run's RNG; teachers with a text condition
    # only (SeeSR; which text: teacher.train_prompt)
    null_text_ratio: float = 0.0  # official TAD-SeeSR: 0.5
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self):
        problems = missing_dir("cache_dir", self.cache_dir, "teacher cache")
        problems += timestep_range_problems("hsd_timesteps", self.hsd_timesteps)
        for key in ("lambda_distill", "lambda_hsd", "lambda_adv"):
            if getattr(self, key) < 0:
                problems.append((key, "must be >= 0"))
        if not 0 <= self.null_text_ratio <= 1:
            problems.append(("null_text_ratio", f"must be in [0, 1], got {self.null_text_ratio}"))
        return problems


class TadsrRecipe(Recipe):
    """TAD-SR with any diffusion ``Teacher`` that has ``features`` (ResShift, SeeSR, ...)."""

    Config = TadsrConfig

    def __init__(self, cfg: TadsrConfig, *, device, teacher=None):
        super().__init__(cfg, device=device)
        self.teacher = teacher if teacher is not None else build_teacher(cfg.teacher, device)
        if not self.teacher.supports("features"):
            raise ValueError(f"TAD-SR needs a teacher with encoder features; "
                             f"{type(self.teacher).__name__} has none")  # fmt: skip
        if cfg.null_text_ratio > 0 and not self.teacher.supports("train_cond"):
            raise ValueError(f"method.null_text_ratio={cfg.null_text_ratio}, but "
                             f"{type(self.teacher).__name__} has no text condition")  # fmt: skip
        self.levels = [*cfg.disc.levels, *([MIDDLE] if cfg.disc.include_middle else [])]
        self.student = self.teacher.make_student()  # init = the teacher's denoiser (Alg. 1)
        channels = self.teacher.feature_channels(self.levels)
        self.disc = TimeAwareDiscriminator(channels, **cfg.disc.kwargs)
        self.cache = TeacherCache(cfg.cache_dir) if cfg.cache_dir else None
        if self.cache is not None:  # CachedTeacher refuses another teacher's outputs
            self.source = CachedTeacher(self.cache, self.teacher)
        else:
            self.source = LiveTeacher(self.teacher, cfg.cache_seed, fresh_noise=cfg.fresh_noise)

    @classmethod
    def student_spec(cls, cfg: TadsrConfig):
        return cfg.teacher  # the student is a copy of the teacher's denoiser

    def trainable(self):
        return {"disc": self.disc, "student": self.student}

    def ema_targets(self):
        return ["student"]

    def partitioned(self):
        return self.teacher.partitionable() if self.cfg.teacher_partition == "zero3" else {}

    def optimizer_overrides(self):
        disc = self.cfg.disc
        over = {"grad_clip": disc.grad_clip}  # official: the discriminator is never clipped
        if disc.lr:
            over["lr"] = disc.lr
        if disc.lr_schedule == "constant":  # official: the discriminator's lr never changes
            over["scheduler"] = {"kind": "constant", "warmup_steps": 0}
        return {"disc": over}

    def make_loader(self, data_cfg, **kwargs):
        from distsr.data.reader import make_train_loader

        return make_train_loader(data_cfg, cache=self.cache, **kwargs)

    def features(self, z0: torch.Tensor, t, eps, cond: dict) -> list[torch.Tensor]:
        """F_k = Enc_F(q(z0, t), t, y) (Eq. 9), differentiable w.r.t. z0."""
        z_t = self.teacher.noised(z0, t, cond, eps)
        return self.teacher.features(z_t, t, cond, self.levels)

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        cfg, teacher = self.cfg, self.teacher
        T = teacher.num_timesteps
        tgt = self.source.targets(batch, step)
        z0_tch, z_gt = tgt["z0_tch"], tgt["z_gt"]
        # the student's text (the teacher's trajectory above kept the lq prompt)
        cond = teacher.train_cond(tgt["cond"], self.null_text(batch["lq"].shape[0]))
        # Alg. 1 line 3: one student step from the same z_T as the teacher's trajectory
        z0_stu = teacher.student_step(self.nets["student"], teacher.prior(cond, tgt["noise"]), cond)

        # Alg. 1 lines 4-6: discriminator update on noised fake (student) and real latents, at
        # the same t and eps (Eq. 11); t ~ U{0..T-1} (official: U{0..T-2}), eps that of z_T
        # (lines 16/18) or a fresh draw (official)
        batch_size, device = z0_stu.shape[0], z0_stu.device
        if cfg.disc.timesteps:
            t = timesteps_from_range(cfg.disc.timesteps, batch_size, device)
        else:
            t = torch.randint(0, T if cfg.disc.include_last_t else T - 1, (batch_size,),
                              device=device)  # fmt: skip
        reuse = cfg.disc.reuse_prior_noise
        eps = tgt["noise"].float() if reuse else hsd_noise(z0_stu.detach(), cfg.noise)
        with torch.no_grad():
            f_fake = self.features(z0_stu.detach(), t, eps, cond)
            f_real = self.features(z_gt, t, eps, cond)
        loss_d = d_hinge_loss(self.nets["disc"](f_fake, t), self.nets["disc"](f_real, t),
                              heads=cfg.disc.heads)  # fmt: skip
        # guards: a student step that will be non-finite skips this update too (engine rule)
        yield Update("disc", loss_d, guards=(z0_stu.detach(), z0_tch))

        # Alg. 1 lines 7-10: generator update with the discriminator frozen (Eq. 13)
        loss_distill = F.mse_loss(z0_stu, z0_tch)  # vanilla distillation
        if cfg.hsd_timesteps:
            t_hsd = timesteps_from_range(cfg.hsd_timesteps, batch_size, device)
        else:
            t_hsd = sample_hsd_timesteps(batch_size, T, max_frac=cfg.hsd_max_frac, device=device)
        loss_hsd = hsd_loss(z0_stu, z0_tch, teacher, cond, t_hsd, hsd_noise(z0_tch, cfg.noise))
        with frozen(self.disc):
            logits = self.plain("disc")(self.features(z0_stu, t, eps, cond), t)
            loss_adv = g_adv_loss(logits, heads=cfg.disc.heads)
        loss = cfg.lambda_distill * loss_distill + cfg.lambda_hsd * loss_hsd
        loss = loss + cfg.lambda_adv * loss_adv
        logs = {"distill": loss_distill.item(), "adv_g": loss_adv.item(), "d_loss": loss_d.item()}
        yield Update("student", loss, logs)

    def null_text(self, batch_size: int) -> torch.Tensor | None:
        """Which samples train with the empty prompt: Bernoulli(null_text_ratio) each, from the
        process RNG (checkpointed with the run, so a resume draws the same); None at ratio 0,
        which draws nothing."""
        ratio = self.cfg.null_text_ratio
        return torch.rand(batch_size) < ratio if ratio > 0 else None

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | teacher (T steps) | student (1 step) | gt, for the first 4 samples."""
        batch = first(batch, 4)
        tgt = self.source.targets(batch, step=-1)  # draw 0: a preview takes nothing from the RNG
        cond, teacher = tgt["cond"], self.teacher
        z0_stu = teacher.student_step(self.nets["student"], teacher.prior(cond, tgt["noise"]), cond)
        student = teacher.decode(z0_stu)
        lq = batch["lq"].to(student.device, torch.float32)
        bicubic = F.interpolate(lq, size=student.shape[-2:], mode="bicubic", align_corners=False)
        return {"bicubic": bicubic.clamp(0, 1), "teacher": teacher.decode(tgt["z0_tch"]),
                "student": student, "gt": teacher.decode(tgt["z_gt"])}  # fmt: skip


def timestep_range_problems(key: str, spec: list[int] | None) -> list[tuple[str, str]]:
    if spec is None:
        return []
    if len(spec) != 3 or spec[2] < 1 or spec[0] < 0 or not range(*spec):
        return [(key, f"must be [start, stop, step] of a non-empty range, got {spec}")]
    return []


def timesteps_from_range(spec: list[int], batch: int, device) -> torch.Tensor:
    """t uniform over range(*spec), one per sample (from the process RNG), LongTensor [B]."""
    values = torch.arange(*spec)
    return values[torch.randint(len(values), (batch,))].to(device)


def first(value, n: int):
    """The first ``n`` samples of a (nested) batch: tensors and lists sliced, the rest kept."""
    if isinstance(value, dict):
        return {k: first(v, n) for k, v in value.items()}
    if isinstance(value, torch.Tensor | list | tuple):
        return value[:n]
    return value
