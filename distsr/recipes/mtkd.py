"""MTKD: multi-teacher knowledge distillation (Jiang et al., paper 004; METHODS.md §4), two runs.

Stage 1, ``mtkd_aggregator`` (Sec. 3.1): the N teachers' outputs sr_1..sr_N (SR model files,
``teachers.sr``; read from the teacher cache) are aggregated by the DCTSwin network
(``models.dctswin``) into mt_hr, trained with
    L_KA = || gt - mt_hr ||_1                                            (Eq. 1)
Its export (``export/aggregator.safetensors``) is then frozen: ``teacher.kind: aggregated``
caches mt_hr with ``jobs/cache_teacher.py``.

Stage 2, ``mtkd`` (Sec. 3.2): the student against gt and mt_hr,
    L_stu = || sr_stu - gt ||_1                                          (Eq. 2)
    L_dis = 1/(3K+1) sum_{i,k} || DWT_{i,k}(sr_stu) - DWT_{i,k}(mt_hr) ||_1,  K = 1  (Eq. 3)
    L     = alpha * L_stu + L_DWT = task_weight * L_stu + kd_weight * L_dis,   alpha = 0.1  (Eq. 4)
alpha weighs the ground-truth term (the paper finds its contribution "rather limited"); the
wavelet term toward mt_hr carries the distillation, so task_weight 0.1 and kd_weight 1 by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from distsr.models.dctswin import DCTSwinConfig
from distsr.recipes.base import Update
from distsr.recipes.kd import (
    KDLossConfig,
    KDRecipe,
    SourceConfig,
    StudentConfig,
    build_kd_loss,
    build_student,
    task_loss,
)
from distsr.teachers.sr import (
    AggregatedTeacherConfig,
    RegressionTeachersConfig,
    build_aggregator,
    stack_outputs,
)


@dataclass
class AggregatorConfig(SourceConfig):
    teachers: RegressionTeachersConfig = field(default_factory=RegressionTeachersConfig)
    aggregator: DCTSwinConfig = field(default_factory=DCTSwinConfig)


class AggregatorRecipe(KDRecipe):
    """MTKD stage 1: the DCTSwin aggregator on the cached teacher outputs, L1 to gt."""

    Config = AggregatorConfig

    def __init__(self, cfg: AggregatorConfig, *, device, teacher=None):
        super().__init__(cfg, device=device, teacher=teacher)
        n = len(self.teacher.outputs)
        self.aggregator = build_aggregator(cfg.aggregator, n, cfg.teachers.scale)

    def make_teacher(self, cfg: AggregatorConfig, device):
        from distsr.registry import build_teacher

        return build_teacher(cfg.teachers, device)

    def trainable(self):
        return {"aggregator": self.aggregator}

    def ema_targets(self):
        return ["aggregator"]

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        _, gt, tgt = self.inputs(batch, step)
        srs = stack_outputs(self.teacher, tgt["z0_tch"])  # [sr_1 .. sr_N] on channels
        mt_hr = self.nets["aggregator"](srs)
        loss = task_loss(mt_hr, gt)  # L_KA = || gt - mt_hr ||_1  (Eq. 1)
        yield Update("aggregator", loss)

    def columns(self, lq: torch.Tensor, tgt: dict) -> dict[str, torch.Tensor]:
        outs = tgt["z0_tch"] if isinstance(tgt["z0_tch"], dict) else {"z0": tgt["z0_tch"]}
        srs = stack_outputs(self.teacher, tgt["z0_tch"])
        mt_hr = self.nets["aggregator"](srs).clamp(0, 1)
        teachers = {name.removeprefix("z0."): sr.clamp(0, 1) for name, sr in outs.items()}
        return {**teachers, "aggregated": mt_hr}


@dataclass
class MtkdConfig(SourceConfig):
    teacher: AggregatedTeacherConfig = field(default_factory=AggregatedTeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd_loss: KDLossConfig = field(default_factory=lambda: KDLossConfig("bandwise", levels=1))
    task_weight: float = 0.1  # alpha on L_stu (Eq. 2), Eq. 4
    kd_weight: float = 1.0  # on L_dis = L_DWT (Eq. 3), Eq. 4

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate()
        for key in ("task_weight", "kd_weight"):
            if getattr(self, key) < 0:
                problems.append((key, "must be >= 0"))
        if self.student.scale != self.teacher.scale:
            problems.append(("student.scale", f"{self.student.scale} != teacher.scale "
                                              f"{self.teacher.scale}"))  # fmt: skip
        return problems


class MtkdRecipe(KDRecipe):
    """MTKD stage 2: a student distilled from the frozen aggregated teacher (mt_hr)."""

    Config = MtkdConfig

    def __init__(self, cfg: MtkdConfig, *, device, teacher=None):
        super().__init__(cfg, device=device, teacher=teacher)
        self.student = build_student(cfg.student)
        self.kd_loss = build_kd_loss(cfg.kd_loss).to(device)

    def make_teacher(self, cfg: MtkdConfig, device):
        from distsr.registry import build_teacher

        return build_teacher(cfg.teacher, device)

    def trainable(self):
        return {"student": self.student}

    def ema_targets(self):
        return ["student"]

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        lq, gt, tgt = self.inputs(batch, step)
        sr = self.nets["student"](lq).float()  # I_stu
        loss_stu = task_loss(sr, gt)  # Eq. 2
        loss_dis = self.kd_loss(sr, tgt["z0_tch"])  # Eq. 3: DWT bands vs mt_hr, K = 1
        loss = self.cfg.task_weight * loss_stu + self.cfg.kd_weight * loss_dis  # Eq. 4
        yield Update("student", loss, {"task": loss_stu.item(), "kd": loss_dis.item()})

    def columns(self, lq: torch.Tensor, tgt: dict) -> dict[str, torch.Tensor]:
        return {"aggregated": tgt["z0_tch"].clamp(0, 1),
                "student": self.nets["student"](lq).float().clamp(0, 1)}  # fmt: skip
