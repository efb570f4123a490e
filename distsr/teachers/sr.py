"""Teachers from SR model files (DTKD / MTKD, METHODS.md §3-4), configured by a list of files.

* ``RegressionTeachersConfig`` (``kind: regression``): ``model_files``, each any SR model file
  (architecture detected from its keys, ``models.sr.load_sr``; a file no architecture fits
  raises one error naming everything tried) or an ncnn graph ``.param`` (its ``.bin`` beside
  it; ``models.ncnn``: RRDBNet, SRVGGNetCompact, SRMD with the bicubic degradation map). One
  file is a ``RegressionTeacher``; several are a ``MultiTeacher`` with one output per file
  (``z0.<name>``), cached under one fingerprint that covers every file.
* ``AggregatedTeacherConfig`` (``kind: aggregated``): the same files plus the trained DCTSwin
  aggregator of MTKD stage 1 (``checkpoint``, the stage-1 run's export): ``AggregatedTeacher``,
  whose one output is ``mt_hr`` = aggregator(teachers' outputs) (paper 004, Sec. 3.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from distsr.config import missing_file
from distsr.fingerprint import hash_modules
from distsr.models.dctswin import DCTSwin, DCTSwinConfig
from distsr.teachers.base import Teacher
from distsr.teachers.regression import (
    ImageSpaceTeacher,
    MultiTeacher,
    RegressionTeacher,
    regression_teacher,
)


@dataclass
class RegressionTeachersConfig:
    kind: Literal["regression"] = "regression"
    model_files: list[str] = field(default_factory=list)  # SR model files, any architecture
    names: list[str] = field(default_factory=list)  # one per file; default: from the arch
    scale: int = 4  # every file must be a x``scale`` model

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.model_files:
            problems.append(("model_files", "needs at least one SR model file"))
        for i, path in enumerate(self.model_files):
            problems += missing_file(f"model_files[{i}]", path, "SR model file")
        if self.names and len(self.names) != len(self.model_files):
            problems.append(("names", f"{len(self.names)} names for {len(self.model_files)} "
                                      "model files"))  # fmt: skip
        bad = [n for n in self.names if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
        if bad or len(set(self.names)) != len(self.names):
            problems.append(("names", f"must be unique, of letters, digits, _ and -: {bad}"))
        if self.scale < 1:
            problems.append(("scale", f"must be >= 1, got {self.scale}"))
        return problems


@dataclass
class AggregatedTeacherConfig(RegressionTeachersConfig):
    kind: Literal["aggregated"] = "aggregated"  # type: ignore[assignment]
    checkpoint: str = ""  # the trained aggregator (mtkd_aggregator run: export/aggregator.*)
    aggregator: DCTSwinConfig = field(default_factory=DCTSwinConfig)

    def validate(self) -> list[tuple[str, str]]:
        problems = super().validate()
        if not self.checkpoint:
            problems.append(("checkpoint", "needs the trained aggregator (MTKD stage 1 export)"))
        return problems + missing_file("checkpoint", self.checkpoint, "aggregator weights")


def teacher_names(archs: list[str]) -> list[str]:
    """Output names from architecture names: lower case, ``_2``, ``_3`` ... for repeats."""
    names = []
    for arch in archs:
        base = re.sub(r"[^a-z0-9]+", "_", arch.lower()).strip("_") or "teacher"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def build_regression_teachers(cfg: RegressionTeachersConfig, device) -> Teacher:
    """One file: a ``RegressionTeacher``; several: a ``MultiTeacher`` (one output per file)."""
    loaded = [load_teacher_file(path, cfg.scale) for path in cfg.model_files]
    if len(loaded) == 1:
        return loaded[0].to(device)
    names = cfg.names or teacher_names([t.arch for t in loaded])
    return MultiTeacher(dict(zip(names, loaded, strict=True))).to(device)


def load_teacher_file(path: str, scale: int) -> RegressionTeacher:
    """A ``RegressionTeacher`` from an SR model file, or from an ncnn ``.param`` graph (the
    pretrained networks of the ``[teachers]`` wheels, ``models.ncnn.find_ncnn_models``); SRMD
    gets the delta-kernel degradation map (bicubic inputs), ``models.ncnn.load_ncnn_model``."""
    if not str(path).endswith(".param"):
        return regression_teacher(path, scale)
    from distsr.models.ncnn import detect_arch, load_ncnn_model, read_param

    net = load_ncnn_model(path)
    with torch.no_grad():
        found = net(torch.zeros(1, 3, 4, 4)).shape[-1] // 4
    if found != scale:
        raise ValueError(f"{path} is a x{found} ncnn model, expected x{scale}")
    return RegressionTeacher(net, scale, f"{detect_arch(read_param(path))} (ncnn)")


class AggregatedTeacher(ImageSpaceTeacher):
    """MTKD's frozen knowledge aggregation: ``sample`` = DCTSwin(concat of the teachers' outputs),
    images in [0, 1] (paper 004, Sec. 3.1-3.2). ``teachers`` is a ``MultiTeacher`` (or one
    regression teacher)."""

    kind = "aggregated"

    def __init__(self, teachers: Teacher, aggregator: DCTSwin):
        super().__init__()
        self.teachers, self.aggregator = teachers, aggregator
        self.stored = tuple(teachers.stored)
        self.noise_tensors = teachers.noise_tensors
        self.freeze()
        self._weights_hash: str | None = None

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        return self.teachers.prepare(lq, stored)

    def noise_shape(self, cond: dict):
        return self.teachers.noise_shape(cond)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        srs = self.teachers.sample(cond, noise)
        return self.aggregator(stack_outputs(self.teachers, srs)).float()

    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:
            extra = {"cfg": vars(self.aggregator.cfg), "scale": self.aggregator.scale}
            self._weights_hash = hash_modules([("aggregator", self.aggregator)], extra=extra)
        return {"kind": self.kind, "teachers": self.teachers.fingerprint_parts(),
                "aggregator": self._weights_hash}  # fmt: skip


def stack_outputs(teacher: Teacher, outputs) -> torch.Tensor:
    """The teachers' outputs concatenated on channels, in ``teacher.outputs`` order (MTKD's
    aggregator input); a single teacher's tensor as it is."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    return torch.cat([outputs[name].float() for name in teacher.outputs], dim=1)


def build_aggregator(cfg: DCTSwinConfig, num_inputs: int, scale: int) -> DCTSwin:
    return DCTSwin(num_inputs, scale, cfg)


def load_aggregator(cfg: AggregatedTeacherConfig) -> DCTSwin:
    """The stage-1 aggregator from its export (strict: missing / unexpected keys named)."""
    from distsr.models.checkpoint import check_state_dict, read_checkpoint

    net = build_aggregator(cfg.aggregator, len(cfg.model_files), cfg.scale)
    state = read_checkpoint(cfg.checkpoint)
    report = check_state_dict(net, state)
    if report:
        n = len(cfg.model_files)
        raise ValueError(f"{cfg.checkpoint} does not fit the configured DCTSwin aggregator "
                         f"(teacher.aggregator, {n} teachers):{report}")  # fmt: skip
    net.load_state_dict(state)
    return net


def build_aggregated_teacher(cfg: AggregatedTeacherConfig, device) -> AggregatedTeacher:
    teachers = build_regression_teachers(cfg, device)
    return AggregatedTeacher(teachers, load_aggregator(cfg)).to(device)
