"""What the output-distillation recipes share (DTKD, MTKD; METHODS.md §3-4): a single-pass SR
student, a frozen teacher whose outputs are images, read from the teacher cache or run live,
the task loss, the frequency-domain KD loss, and DTKD's linear ramp.

The student is any ``models.sr.build_sr`` network (official key names, so the exported weights
load in the official code and back through ``models.sr.load_sr``). The teacher is reached only
through ``Teacher`` / ``TeacherSource``: ``targets(batch)["z0_tch"]`` is its output image (a
dict of images for a multi-teacher), ``z_gt`` the gt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distsr.config import missing_dir
from distsr.data.cache import TeacherCache
from distsr.models.sr.build import StudentConfig
from distsr.recipes.base import Recipe
from distsr.recipes.tadsr import first
from distsr.teachers.base import Teacher
from distsr.teachers.source import CachedTeacher, LiveTeacher


def build_student(cfg: StudentConfig) -> nn.Module:
    from distsr.models.sr import build_sr
    from distsr.models.sr.loader import load_strict, read_sr_state_dict

    net = build_sr(cfg.arch, cfg.preset, scale=cfg.scale, **cfg.kwargs)
    if cfg.checkpoint:
        net = load_strict(net, read_sr_state_dict(cfg.checkpoint), cfg.checkpoint)
    return net.train()


@dataclass
class KDLossConfig:
    """``losses.wavelet.build_kd_loss``: "grouped" (DTKD), "bandwise" (MTKD), "fft"; or "l1",
    the pixel L1 to the teacher's output (vanilla output KD, the baseline both papers beat)."""

    name: Literal["grouped", "bandwise", "fft", "l1"] = "grouped"
    levels: int = 2  # J
    weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])  # grouped: LF, MF, HF
    transform: Literal["dwt", "dtcwt"] = "dwt"
    wave: str = "haar"

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.levels < 1:
            problems.append(("levels", f"must be >= 1, got {self.levels}"))
        if self.name == "grouped" and len(self.weights) != 3:
            problems.append(("weights", f"(w_LF, w_MF, w_HF), got {self.weights}"))
        return problems


def build_kd_loss(cfg: KDLossConfig) -> nn.Module:
    from distsr.losses.wavelet import build_kd_loss as build

    if cfg.name == "l1":
        return nn.L1Loss()
    if cfg.name == "fft":
        return build("fft")
    kwargs = {"levels": cfg.levels, "transform": cfg.transform, "wave": cfg.wave}
    if cfg.name == "grouped":
        kwargs["weights"] = tuple(cfg.weights)
    return build(cfg.name, **kwargs)


@dataclass
class RampConfig:
    """lambda(i) = lambda_max * min(i, end_step) / end_step (DTKD Sec. 3.5, METHODS.md §3)."""

    lambda_max: float = 1.0  # lambda_final
    end_step: int | None = None  # N, where lambda reaches lambda_max; None: engine.max_steps

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.end_step is not None and self.end_step < 1:
            problems.append(("end_step", f"must be >= 1, got {self.end_step}"))
        if self.lambda_max < 0:
            problems.append(("lambda_max", f"must be >= 0, got {self.lambda_max}"))
        return problems


def linear_ramp(step: int, cfg: RampConfig) -> float:
    """0 at step 0, rising linearly to ``lambda_max`` at ``end_step``, constant after."""
    if cfg.end_step is None:
        raise ValueError("ramp.end_step is unset: the run config sets it to engine.max_steps")
    return cfg.lambda_max * min(max(step, 0), cfg.end_step) / cfg.end_step


@dataclass
class SourceConfig:
    """Where teacher outputs come from: the cache (``cache_dir``) or the live teacher."""

    cache_dir: str | None = None  # cache/<fingerprint> from jobs/cache_teacher.py; None = live
    cache_seed: int = 0  # noise seed of a live diffusion teacher
    fresh_noise: bool = True  # live: a fresh z_T every step; false: the per-key seeded noise

    def validate(self) -> list[tuple[str, str]]:
        return missing_dir("cache_dir", self.cache_dir, "teacher cache")


def task_loss(sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """L_task = || sr - gt ||_1 (mean absolute error), in float32."""
    return F.l1_loss(sr.float(), gt.float())


class KDRecipe(Recipe):
    """A frozen image-space teacher behind a ``TeacherSource``; subclasses add the trained
    network and ``training_step``. ``make_teacher(cfg, device)`` builds the teacher."""

    @classmethod
    def student_spec(cls, cfg):
        """The exported network: the single-pass student (a stage without one has none)."""
        student = getattr(cfg, "student", None)
        return student if student is not None else super().student_spec(cfg)

    def __init__(self, cfg: SourceConfig, *, device, teacher=None):
        super().__init__(cfg, device=device)
        self.teacher: Teacher = teacher if teacher is not None else self.make_teacher(cfg, device)
        self.cache = TeacherCache(cfg.cache_dir) if cfg.cache_dir else None
        if self.cache is not None:  # CachedTeacher refuses another teacher's outputs
            self.source = CachedTeacher(self.cache, self.teacher)
        else:
            self.source = LiveTeacher(self.teacher, cfg.cache_seed, fresh_noise=cfg.fresh_noise)

    def make_teacher(self, cfg, device) -> Teacher:
        raise NotImplementedError

    def make_loader(self, data_cfg, **kwargs):
        from distsr.data.reader import make_train_loader

        return make_train_loader(data_cfg, cache=self.cache, **kwargs)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | the recipe's ``columns`` (teacher(s), trained network) | gt, 4 samples."""
        lq, gt, tgt = self.inputs(first(batch, 4))
        return {"bicubic": bicubic(lq, gt), **self.columns(lq, tgt), "gt": gt}

    def columns(self, lq: torch.Tensor, tgt: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inputs(
        self, batch: dict, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(lq and gt float32, the teacher targets at ``step``)."""
        lq, gt = (batch[k].to(self.device, torch.float32) for k in ("lq", "gt"))
        return lq, gt, self.source.targets(batch, step)


def bicubic(lq: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(lq.float(), size=like.shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp(0, 1)
