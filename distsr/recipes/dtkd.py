"""DTKD: diffusion-to-transformer output distillation (Park & Song, papers 001/003; METHODS.md §3).

A frozen teacher (ResShift-15, its outputs decoded to pixels: ``teachers.pixels.PixelOutputs``;
or any SR model file) and a single-pass student (SwinIR-small) trained with
    L = L_task + lambda(i) * L_KD                                        (Sec. 3.5)
    L_task = || S(lq) - gt ||_1
    L_KD   = w_LF L1(LL2) + w_MF L1({LH2, HL2, HH2}) + w_HF L1({LH1, HL1, HH1})  of the two-level
             DWT of S(lq) - teacher(lq)                                  (Sec. 3.4; 1/2/1 best)
    lambda(i) = lambda_final * i / N, from 0                             (Sec. 3.5)
Output-level distillation only (no features). Cache the teacher once with
``jobs/cache_teacher.py ... decode=true`` and train from ``method.cache_dir``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from distsr.recipes.base import Update
from distsr.recipes.kd import (
    KDLossConfig,
    KDRecipe,
    RampConfig,
    SourceConfig,
    StudentConfig,
    build_kd_loss,
    build_student,
    linear_ramp,
    task_loss,
)
from distsr.teachers.pixels import PixelOutputs
from distsr.teachers.resshift import TeacherConfig
from distsr.teachers.sr import RegressionTeachersConfig


@dataclass
class DtkdConfig(SourceConfig):
    # resshift (the paper) or SR model files (kind: regression), decoded to pixels either way
    teacher: TeacherConfig | RegressionTeachersConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=lambda: StudentConfig("swinir", "small"))
    kd_loss: KDLossConfig = field(default_factory=KDLossConfig)  # grouped, J = 2, 1/2/1
    ramp: RampConfig = field(default_factory=RampConfig)

    def complete(self, run) -> None:
        """N defaults to the run's length: the ramp ends at ``engine.max_steps`` unless set."""
        if self.ramp.end_step is None:
            self.ramp.end_step = run.engine.max_steps


class DtkdRecipe(KDRecipe):
    Config = DtkdConfig

    def __init__(self, cfg: DtkdConfig, *, device, teacher=None):
        super().__init__(cfg, device=device, teacher=teacher)
        self.student = build_student(cfg.student)
        self.kd_loss = build_kd_loss(cfg.kd_loss).to(device)

    def make_teacher(self, cfg: DtkdConfig, device):
        from distsr.registry import build_teacher

        return PixelOutputs(build_teacher(cfg.teacher, device))

    def trainable(self):
        return {"student": self.student}

    def ema_targets(self):
        return ["student"]

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        lq, gt, tgt = self.inputs(batch, step)
        sr = self.nets["student"](lq).float()  # S(lq)
        loss_task = task_loss(sr, gt)  # || S(lq) - gt ||_1
        loss_kd = self.kd_loss(sr, tgt["z0_tch"])  # grouped two-level DWT loss vs the teacher
        lam = linear_ramp(step, self.cfg.ramp)  # lambda(i) = lambda_final * i / N
        loss = loss_task + lam * loss_kd
        yield Update("student", loss, {"task": loss_task.item(), "kd": loss_kd.item(),
                                       "lambda": lam})  # fmt: skip

    def columns(self, lq: torch.Tensor, tgt: dict) -> dict[str, torch.Tensor]:
        return {"teacher": tgt["z0_tch"].clamp(0, 1),
                "student": self.nets["student"](lq).float().clamp(0, 1)}  # fmt: skip
