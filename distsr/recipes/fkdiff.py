"""FKdiff (Chen, paper 000; METHODS.md §5): three runs, each one recipe.

Stage 1, ``fkdiff_pretrain`` (Sec. 3.1, Fig. 1a): the teacher restorer and CFE_D together,
    Z = CFE_D(Down(Concat(gt, lq))),  sr = Teacher(lq, Z),  L = || gt - sr ||_1
(Adam, lr 2e-4, batch 9). Its export ``restorer.safetensors`` holds ``restorer.*`` + ``cfe_d.*``.

Stage 2, ``fkdiff_prior`` (Sec. 3.1, Fig. 1b-c): stage 1 frozen; CFE_R and the prior denoiser learn
Z = CFE_D(...) by DDPM on the compact vector, T = 4, guided by D = CFE_R(Down(lq)):
    Z_t = sqrt(abar_t) Z + sqrt(1 - abar_t) eps,  L = PriorSchedule.loss(denoiser, Z, D, t, eps)
Its export ``prior.safetensors`` holds ``cfe_r.*`` + ``denoiser.*``. The two exports make the
``fkdiff`` teacher (``teachers.fkdiff``), whose sampled Z_hat the teacher cache stores.

PHexKD, ``fkdiff`` (Sec. 3.3, Fig. 4): the locked teacher (t), FASRer_L (l) and FASRer_S (s), all
fed (lq, Z_hat); an FDD block per paired layer and pair (``losses.fdd``):
    L_KD^{a,b} = sum_i L_FDD^{a,b}(f_a[i], f_b[i]) + L1(sr_a, sr_b)
    L = L_KD^{s,t} + L_KD^{l,t} + L_KD^{s,l} + sum_{i in s,l,t} L1(gt, sr_i)
(Adam, lr 1e-4, batch 5). The teacher stays locked (the paper's "online" ablation fails): no
parameter of it takes a gradient, and L1(gt, sr_t) is a constant that is only logged. Three
engines, ``student`` (FASRer_S, the exported student), ``student_l`` and ``fdd``, get exactly
the gradients of the one loss L: each engine's update is the part of L that depends on it, the
other networks' outputs detached and the FDD blocks frozen in the students' parts, all computed
from the same weights before the first update is applied. ``distill: false`` trains FASRer_S
alone on L1(gt, sr_s) with the same Z_hat (the baseline of the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.fkdiff.common import pad_to_multiple
from distsr.models.fkdiff.config import (
    CFE_PAPER,
    FASRER_L,
    FASRER_S,
    PRIOR_PAPER,
    TEACHER_PAPER,
    CFEConfig,
    FASRerConfig,
    FKdiffNetConfig,
    PriorConfig,
)
from distsr.recipes.base import Recipe, Update, frozen
from distsr.recipes.kd import KDRecipe, SourceConfig, bicubic, task_loss
from distsr.recipes.tadsr import first
from distsr.teachers.fkdiff import (
    FKdiffTeacherConfig,
    PriorNets,
    Stage1Nets,
    check_prior_channels,
    load_parts,
)


def _copy(preset):
    return lambda: replace(preset)


# ---------------------------------------------------------------- stage 1: restorer + CFE_D


@dataclass
class PretrainConfig:
    net: FKdiffNetConfig = field(default_factory=_copy(TEACHER_PAPER))
    cfe: CFEConfig = field(default_factory=_copy(CFE_PAPER))

    def validate(self) -> list[tuple[str, str]]:
        if self.net.prior_channels != self.cfe.prior_channels:
            return [("cfe.prior_channels", f"C' {self.cfe.prior_channels} != net's "
                                           f"{self.net.prior_channels}")]  # fmt: skip
        return []


class PretrainRecipe(Recipe):
    """FKdiff stage 1: the restorer and CFE_D trained together with L1 (Fig. 1a)."""

    Config = PretrainConfig

    def __init__(self, cfg: PretrainConfig, *, device):
        super().__init__(cfg, device=device)
        self.stage1 = Stage1Nets(cfg.net, cfg.cfe).to(device)

    def trainable(self):
        return {"restorer": self.stage1}

    def ema_targets(self):
        return ["restorer"]

    def images(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(batch[k].to(self.device, torch.float32) for k in ("lq", "gt"))

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        lq, gt = self.images(batch)
        sr = self.nets["restorer"](lq, gt)  # Z = CFE_D(Down(Concat(gt, lq))); sr = T(lq, Z)
        yield Update("restorer", task_loss(sr, gt))  # L_L1(I_GT, I_HR)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        lq, gt = self.images(first(batch, 4))
        sr = self.nets["restorer"](lq, gt).float().clamp(0, 1)
        return {"bicubic": bicubic(lq, gt), "restorer(lq, Z)": sr, "gt": gt.float()}


# ---------------------------------------------------------------- stage 2: prior diffusion


@dataclass
class PriorStageConfig(PretrainConfig):
    restorer_checkpoint: str = ""  # the stage-1 export (restorer.* + cfe_d.*), frozen here
    prior: PriorConfig = field(default_factory=_copy(PRIOR_PAPER))

    def validate(self) -> list[tuple[str, str]]:
        from distsr.config import missing_file

        problems = check_prior_channels(self.net, self.cfe, self.prior)
        if not self.restorer_checkpoint:
            problems.append(("restorer_checkpoint", "needs the stage-1 export (fkdiff_pretrain)"))
        return problems + missing_file("restorer_checkpoint", self.restorer_checkpoint,
                                       "FKdiff stage-1 weights")  # fmt: skip


class PriorRecipe(Recipe):
    """FKdiff stage 2: CFE_R + the denoiser learn the frozen CFE_D's Z by diffusion (Fig. 1b-c)."""

    Config = PriorStageConfig

    def __init__(self, cfg: PriorStageConfig, *, device):
        from distsr.models.fkdiff.prior import PriorSchedule

        super().__init__(cfg, device=device)
        stage1 = Stage1Nets(cfg.net, cfg.cfe)
        load_parts(stage1, cfg.restorer_checkpoint, "FKdiff stage 1 (method.net, method.cfe)")
        self.stage1 = stage1.requires_grad_(False).eval().to(device)  # locked after stage 1
        self.prior = PriorNets(cfg.cfe, cfg.prior, cfg.net.in_channels).to(device)
        self.schedule = PriorSchedule(cfg.prior)

    def trainable(self):
        return {"prior": self.prior}

    def ema_targets(self):
        return ["prior"]

    def images(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["lq"].to(self.device, torch.float32),
                batch["gt"].to(self.device, torch.float32))  # fmt: skip

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        lq, gt = self.images(batch)
        with torch.no_grad():
            z0 = self.stage1.cfe_d(lq, gt)  # Z = CFE_D(Down(Concat(gt, lq))), frozen
        t = torch.randint(0, self.schedule.timesteps, (z0.shape[0],))  # step t + 1 ~ U{1..T}
        noise = torch.randn_like(z0)  # Z_t = sqrt(abar_t) Z + sqrt(1 - abar_t) eps
        loss = self.nets["prior"](lq, z0, t, noise, self.schedule)
        yield Update("prior", loss)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """bicubic | restorer(lq, Z_hat) (sampled) | restorer(lq, Z) (stage 1) | gt."""
        lq, gt = self.images(first(batch, 4))
        z0 = self.stage1.cfe_d(lq, gt)
        noises = torch.randn(self.cfg.prior.timesteps + 1, *z0.shape, device=z0.device)
        z_hat = self.plain("prior").sample(lq, noises, self.schedule)
        restore = self.stage1.restorer
        return {"bicubic": bicubic(lq, gt), "restorer(lq, Z_hat)": restore(lq, z_hat)[0],
                "restorer(lq, Z)": restore(lq, z0)[0], "gt": gt}  # fmt: skip


# ---------------------------------------------------------------- PHexKD


@dataclass
class FDDConfig:
    """The FDD blocks (``losses.fdd.FDD``): L_F = eta L_amp + (1 - eta) L_ph,
    L_FDD = lam L_F + (1 - lam) L_S, one block per pair and paired layer in ``levels``."""

    eta: float = 0.5
    lam: float = 0.5
    levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # indices of the 4 features

    def validate(self) -> list[tuple[str, str]]:
        problems = [(k, "must be in [0, 1]") for k in ("eta", "lam")
                    if not 0 <= getattr(self, k) <= 1]  # fmt: skip
        if not self.levels or any(not 0 <= i < 4 for i in self.levels):
            problems.append(("levels", f"indices into the 4 paired features, got {self.levels}"))
        if len(set(self.levels)) != len(self.levels):
            problems.append(("levels", f"repeated: {self.levels}"))
        return problems


@dataclass
class PHexKDConfig(SourceConfig):
    teacher: FKdiffTeacherConfig = field(default_factory=FKdiffTeacherConfig)
    student: FASRerConfig = field(default_factory=_copy(FASRER_S))  # exported: FASRer_S
    student_l: FASRerConfig = field(default_factory=_copy(FASRER_L))
    fdd: FDDConfig = field(default_factory=FDDConfig)
    distill: bool = True  # false: FASRer_S alone, L1 to gt (the same Z_hat)

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate()
        c = self.teacher.prior.prior_channels
        for key in ("student", "student_l"):
            net = getattr(self, key)
            if net.prior_channels != c:
                problems.append((f"{key}.prior_channels", f"{net.prior_channels} != the "
                                                          f"teacher's C' {c}"))  # fmt: skip
            if net.scale != self.teacher.scale:
                problems.append((f"{key}.scale", f"{net.scale} != teacher {self.teacher.scale}"))
        return problems


@dataclass
class FASRerStudent:
    """What a PHexKD run exports for inference: FASRer_S and the teacher's prior diffusion,
    which gives FASRer its Z_hat (``inference.fkdiff``)."""

    student: FASRerConfig
    teacher: FKdiffTeacherConfig


PAIRS = (("s", "t"), ("l", "t"), ("s", "l"))  # L_KD^{s,t}, L_KD^{l,t}, L_KD^{s,l}


class Distillers(nn.Module):
    """One FDD block per pair (a, b) and paired layer i, named ``"{a}{b}{i}"``."""

    def __init__(self, channels: dict[str, list[int]], cfg: FDDConfig):
        from distsr.losses.fdd import FDD

        super().__init__()
        self.levels = list(cfg.levels)
        self.blocks = nn.ModuleDict({
            f"{a}{b}{i}": FDD(channels[a][i], channels[b][i], eta=cfg.eta, lam=cfg.lam)
            for a, b in PAIRS for i in self.levels
        })  # fmt: skip

    def forward(self, feats: dict[str, list[torch.Tensor]], pairs=PAIRS):
        """{(a, b): L_FDD^{a,b} = sum_i FDD(f_a[i], f_b[i])["fdd"]} over ``pairs``."""
        return {(a, b): sum(self.blocks[f"{a}{b}{i}"](feats[a][i], feats[b][i])["fdd"]
                            for i in self.levels) for a, b in pairs}  # fmt: skip


def build_fasrer(cfg: FASRerConfig) -> nn.Module:
    from distsr.models.fkdiff.fasrer import FASRer

    return FASRer(cfg)


class PHexKDRecipe(KDRecipe):
    """FKdiff PHexKD: locked teacher + FASRer_L + FASRer_S + FDD blocks (Sec. 3.3)."""

    Config = PHexKDConfig
    cached_outputs = ("z_hat",)

    def __init__(self, cfg: PHexKDConfig, *, device, teacher=None):
        super().__init__(cfg, device=device, teacher=teacher)
        self.student = build_fasrer(cfg.student).to(device)
        self.student_l = build_fasrer(cfg.student_l).to(device) if cfg.distill else None
        self.fdd = None
        if cfg.distill:
            channels = {
                "t": self.teacher.restorer.feature_channels,
                "l": self.student_l.feature_channels,
                "s": self.student.feature_channels,
            }
            self.fdd = Distillers(channels, cfg.fdd).to(device)
        nets = [self.teacher.restorer, self.student, *([self.student_l] if cfg.distill else [])]
        self.multiple = math.lcm(*(net.size_multiple for net in nets))

    @classmethod
    def student_spec(cls, cfg: PHexKDConfig) -> FASRerStudent:
        return FASRerStudent(cfg.student, cfg.teacher)

    def make_teacher(self, cfg: PHexKDConfig, device):
        from distsr.registry import build_teacher

        return build_teacher(cfg.teacher, device)

    def trainable(self):
        nets = {"student": self.student}
        if self.cfg.distill:
            nets |= {"student_l": self.student_l, "fdd": self.fdd}
        return nets

    def ema_targets(self):
        return ["student"]

    def forwards(self, lq, z_hat, teacher: bool = True) -> dict[str, tuple]:
        """(sr, features) of each network: t locked (no graph), l and s through their engines.
        lq is padded once to a size every network takes as it is, so paired features align."""
        x, h, w = pad_to_multiple(lq, self.multiple)
        out = {"s": self.nets["student"](x, z_hat)}
        if teacher:
            sr_t, f_t = self.teacher.restore(x, z_hat)  # float32, no graph
            out["t"] = (sr_t, f_t)
        if self.cfg.distill:
            out["l"] = self.nets["student_l"](x, z_hat)
        s = self.cfg.student.scale
        return {i: (sr[..., : h * s, : w * s], feats) for i, (sr, feats) in out.items()}

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        lq, gt, tgt = self.inputs(batch, step)
        z_hat = tgt["z0_tch"]  # the teacher's Z_hat (cached, or sampled now)
        out = self.forwards(lq, z_hat, teacher=self.cfg.distill)
        pix = {i: task_loss(sr, gt) for i, (sr, _) in out.items()}  # L1(gt, sr_i)
        if not self.cfg.distill:  # FASRer_S alone
            yield Update("student", pix["s"])
            return
        with frozen(self.plain("fdd")):  # the students' parts: FDD weights are constants
            loss_s, _ = self.hexagon(out, pix, live="s", fdd=self.plain("fdd"))
            loss_l, _ = self.hexagon(out, pix, live="l", fdd=self.plain("fdd"))
        loss_fdd, logs = self.hexagon(out, pix, live=None, fdd=self.nets["fdd"])
        yield Update("student", loss_s, logs)
        yield Update("student_l", loss_l)
        yield Update("fdd", loss_fdd)

    def hexagon(self, out: dict, pix: dict, live: str | None, fdd) -> tuple[torch.Tensor, dict]:
        """The terms of L that depend on network ``live`` (``None``: on the FDD blocks), the
        other networks' outputs detached, and the value of the whole L as logs."""
        keep = {live} if live else set()
        feats = {i: [f if i in keep else f.detach() for f in fs] for i, (_, fs) in out.items()}
        pairs = [p for p in PAIRS if live is None or live in p]
        l_fdd = fdd(feats, pairs)  # L_FDD^{a,b}
        l_out = {(a, b): F.l1_loss(*(out[i][0].float() if i in keep else out[i][0].float().detach()
                                     for i in (a, b))) for a, b in pairs}  # fmt: skip
        kd = {p: l_fdd[p] + l_out[p] for p in pairs}  # L_KD^{a,b} = L_FDD^{a,b} + L1(sr_a, sr_b)
        if live is None:  # the FDD blocks' part: their terms; log the whole L
            logs = {f"kd_{a}{b}": kd[a, b].item() for a, b in pairs}
            logs |= {f"fdd_{a}{b}": l_fdd[a, b].item() for a, b in pairs}
            logs |= {f"pix_{i}": v.item() for i, v in pix.items()}
            logs["total"] = sum(kd.values()).item() + sum(v.item() for v in pix.values())
            return sum(l_fdd.values()), logs
        return sum(kd.values()) + pix[live], {}

    def total_loss(self, lq, gt, z_hat) -> torch.Tensor:
        """L of Sec. 3.3 in one graph (tests compare its gradients with the engines' parts)."""
        out = self.forwards(lq, z_hat)
        feats = {i: fs for i, (_, fs) in out.items()}
        l_fdd = self.plain("fdd")(feats)
        kd = sum(l_fdd[a, b] + F.l1_loss(out[a][0], out[b][0]) for a, b in PAIRS)
        return kd + sum(task_loss(sr, gt) for sr, _ in out.values())

    def columns(self, lq: torch.Tensor, tgt: dict) -> dict[str, torch.Tensor]:
        out = self.forwards(lq, tgt["z0_tch"].float())
        names = {"t": "teacher", "l": "FASRer_L", "s": "FASRer_S"}
        return {names[i]: sr.float().clamp(0, 1) for i, (sr, _) in out.items()}
