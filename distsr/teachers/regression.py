"""One-forward regression teachers (SwinIR, EDSR, RCAN, ...: METHODS.md §3-4) and a multi-teacher
wrapper (MTKD), behind the same ``Teacher`` interface as the diffusion teachers.

A regression teacher works in image space: ``prepare(lq) = {"lq": lq}``, ``sample`` is one
forward ``sr = net(lq)`` (no noise, no ``prior``/``features``), ``encode_gt`` and ``decode`` are
the identity on images in [0, 1]. ``MultiTeacher`` runs several teachers on the same lq and
returns one output per teacher (``outputs = ("z0.<name>", ...)``), so the teacher cache stores
one column per teacher.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from distsr.fingerprint import hash_modules
from distsr.teachers.base import Teacher


class ImageSpaceTeacher(Teacher):
    """A teacher whose outputs are images in [0, 1]: ``encode_gt`` and ``decode`` are the
    identity (clamped)."""

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return gt.to(self.device, torch.float32)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return z0.float().clamp(0, 1)


class RegressionTeacher(ImageSpaceTeacher):
    """A frozen single-pass SR network ``net(lq [0, 1]) -> sr [0, 1]`` at ``scale``."""

    kind = "regression"
    noise_tensors = 0

    def __init__(self, net: nn.Module, scale: int, arch: str = ""):
        super().__init__()
        self.net, self.scale, self.arch = net, int(scale), arch or type(net).__name__
        self.freeze()
        self._weights_hash: str | None = None

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        return {"lq": lq.to(self.device, torch.float32)}

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        """sr = net(lq): one forward; ``noise`` is ignored (there is none)."""
        lq = cond["lq"]
        sr = self.net(lq).float()
        expected = (lq.shape[0], sr.shape[1], lq.shape[2] * self.scale, lq.shape[3] * self.scale)
        if tuple(sr.shape) != expected:
            raise ValueError(f"{self.arch} returned {tuple(sr.shape)} for lq {tuple(lq.shape)}, "
                             f"expected {expected} at x{self.scale}")  # fmt: skip
        return sr

    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:
            self._weights_hash = hash_modules([("net", self.net)], extra={"arch": self.arch})
        return {"kind": self.kind, "arch": self.arch, "weights": self._weights_hash,
                "scale": self.scale}  # fmt: skip


class MultiTeacher(Teacher):
    """Several teachers on the same lq (MTKD, METHODS.md §4): ``sample`` returns
    ``{"z0.<name>": output}`` per teacher. The teachers share the target space (``encode_gt``
    and ``decode`` of the first) and either all draw no noise or all take the same noise."""

    kind = "multi"

    def __init__(self, teachers: Mapping[str, Teacher]):
        super().__init__()
        if not teachers or any("." in name for name in teachers):
            raise ValueError(
                f"MultiTeacher needs named teachers without dots, got {list(teachers)}"
            )
        self.teachers = nn.ModuleDict(dict(teachers))
        self.outputs = tuple(f"z0.{name}" for name in self.teachers)
        self.stored = tuple(f"{n}.{k}" for n, t in self.teachers.items() for k in t.stored)
        self.noise_tensors = max(t.noise_tensors for t in self.teachers.values())
        self.freeze()

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        cond = {}
        for name, teacher in self.teachers.items():
            mine = None if stored is None else {
                k: stored[f"{name}.{k}"] for k in teacher.stored
            }  # fmt: skip
            cond.update({f"{name}.{k}": v for k, v in teacher.prepare(lq, mine).items()})
        return cond

    def _cond(self, cond: dict, name: str) -> dict:
        prefix = f"{name}."
        return {k[len(prefix) :]: v for k, v in cond.items() if k.startswith(prefix)}

    def noise_shape(self, cond: dict):
        shapes = {t.noise_shape(self._cond(cond, n)) for n, t in self.teachers.items()}
        shapes.discard(None)
        if len(shapes) > 1:
            raise ValueError(f"the teachers draw noise of different shapes {sorted(shapes)}")
        return shapes.pop() if shapes else None

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {f"z0.{name}": teacher.sample(self._cond(cond, name), noise)
                for name, teacher in self.teachers.items()}  # fmt: skip

    def _first(self) -> Teacher:
        return next(iter(self.teachers.values()))

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return self._first().encode_gt(gt)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return self._first().decode(z0)

    def fingerprint_parts(self) -> dict:
        parts = {name: t.fingerprint_parts() for name, t in self.teachers.items()}
        return {"kind": self.kind, "teachers": parts}


def regression_teacher(path, scale: int | None = None, **load_kwargs) -> RegressionTeacher:
    """A RegressionTeacher from any SR model file, its architecture detected from the keys
    (``distsr.models.sr.load_sr``; ``scale`` checks the file's scale factor)."""
    from distsr.models.sr import load_sr

    loaded = load_sr(path, scale=scale, **load_kwargs)
    return RegressionTeacher(loaded.net, loaded.scale, loaded.arch)
