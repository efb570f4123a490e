"""The ``Teacher`` interface: frozen model(s) + a sampler behind a few calls (DESIGN.md).

Images cross the interface in [0, 1]; inside, teachers work in [-1, 1] as ResShift does. A
teacher is identified by its fingerprint: a hash of its weights (every module's state_dict, in
sorted key order, with dtypes and shapes) plus the settings that change what ``sample`` returns
(sampler, schedule, scale). The teacher-output cache lives in a folder named after it, and a
cache whose fingerprint differs from the configured teacher is refused (``parts_differ``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from distsr.fingerprint import fingerprint_of


class Teacher(nn.Module):
    """A frozen teacher behind the calls every recipe uses (DESIGN.md "Interfaces").

    Three kinds share it: latent diffusion (ResShift with VQ-f4), pixel diffusion (ResShift with
    the identity first stage) and one-forward regression nets (``sample`` = one forward, no noise,
    no ``prior``/``features``). Tensors called ``z`` live in the teacher's target space: the
    latent of a diffusion teacher, the image itself for a regression teacher.

    * ``prepare(lq, stored=None) -> cond``: the condition of a batch (a dict of tensors). The
      entries named in ``stored`` are what the teacher cache keeps; given them, ``prepare``
      rebuilds the rest from lq alone, cheaply (ResShift: ``z_y`` is stored, the UNet's lq
      condition is recomputed by the one ``condition`` rule). ``prepare_gt(gt)``: the stored
      entries computed from gt (default none; SeeSR's gt-tag prompt).
    * ``noise_shape(cond)``: one sample's prior-eps shape (None: the teacher draws no noise);
      ``noise_tensors``: how many such tensors ``sample`` consumes per sample (the prior eps
      first; ``teachers.noise`` draws them).
    * ``prior(cond, noise) -> z_T``, ``sample(cond, noise) -> z0`` (the full trajectory from
      that z_T), ``outputs``: the names of what ``sample`` returns (one tensor, or a dict with
      one entry per name for a multi-teacher).
    * Diffusion teachers: ``num_timesteps``, ``noised`` (the forward process q), ``denoise`` (one
      network call), ``sqrt_snr`` (d eps / d x0 at a fixed z_t, the HSD weight), ``features`` /
      ``feature_channels`` (encoder features for discriminators), ``make_student`` and
      ``student_step`` (a trainable copy of the denoiser and its one-step rule), ``train_cond``
      (the condition a student trains with; teachers with text can drop it), and
      ``partitionable`` (frozen modules worth sharding with ZeRO-3).
    * ``encode_gt(gt) -> z``, ``decode(z) -> image in [0, 1]``, ``fingerprint()``.

    Images cross the interface in [0, 1]. Subclasses set ``kind`` and implement what they have;
    the rest raises ``NotImplementedError`` naming the teacher, and ``supports(name)`` tells.
    """

    kind: str = "teacher"
    stored: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("z0",)
    noise_tensors: int = 1

    def freeze(self) -> Teacher:
        """No parameter takes gradients and the teacher stays in eval mode."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: dropout and the like stay off

    @property
    def device(self) -> torch.device:
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def supports(self, name: str) -> bool:
        """Whether this teacher implements method ``name`` of the interface."""
        return getattr(type(self), name) is not getattr(Teacher, name)

    def _missing(self, what: str):
        return NotImplementedError(f"{type(self).__name__} ({self.kind}) has no {what}")

    # ---- every teacher ----------------------------------------------------------------------
    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        raise self._missing("prepare")

    def prepare_gt(self, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The entries of ``stored`` computed from gt images in [0, 1] (default: none)."""
        return {}

    def noise_shape(self, cond: dict) -> tuple[int, ...] | None:
        return None

    def sample(self, cond: dict, noise: torch.Tensor | None):
        """The teacher's output from the same z_T = prior(cond, noise) a student starts from."""
        raise self._missing("sample")

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        """gt images in [0, 1] in the target space (the latent z0 = E(gt))."""
        raise self._missing("encode_gt")

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Target space -> image in [0, 1]."""
        raise self._missing("decode")

    def fingerprint_parts(self) -> dict:
        """``{"kind", "weights", ...}``: JSON-able values that decide what ``sample`` returns."""
        raise self._missing("fingerprint_parts")

    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_parts())

    # ---- diffusion teachers -----------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        raise self._missing("diffusion timesteps")

    def prior(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_T, the start of the trajectory (and of a one-step student)."""
        raise self._missing("prior")

    def noised(self, z0: torch.Tensor, t, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_t ~ q(z_t | z0, cond) with the given eps."""
        raise self._missing("forward process")

    def denoise(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """One network call: x0_hat at step t (gradients flow to z_t; weights are frozen)."""
        raise self._missing("denoise")

    def sqrt_snr(self, t, like: torch.Tensor) -> torch.Tensor:
        """a_t / sigma_t as [B, 1, ...] float32, where z_t = a_t z0 + ... + sigma_t eps: the
        factor that turns an x0 difference at a fixed z_t into an eps difference (HSD)."""
        raise self._missing("sqrt_snr")

    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """Encoder features for discriminators (TAD-SR, METHODS.md §2)."""
        raise self._missing("encoder features")

    def feature_channels(self, levels: Sequence) -> list[int]:
        raise self._missing("encoder features")

    def make_student(self) -> nn.Module:
        """A trainable copy of the denoiser (official key names), the student's init."""
        raise self._missing("student")

    def student_step(self, net: nn.Module, z_T: torch.Tensor, cond: dict) -> torch.Tensor:
        """z0 from z_T in one call of ``net`` (a module made by ``make_student``)."""
        raise self._missing("student")

    def train_cond(self, cond: dict, drop: torch.Tensor | None = None) -> dict:
        """The condition a student trains with (default: ``cond``); ``drop`` [B] bool: samples
        whose text becomes the empty prompt (teachers with a text condition only)."""
        if drop is not None:
            raise self._missing("text condition to drop")
        return cond

    def partitionable(self) -> dict[str, nn.Module]:
        """Frozen modules a recipe may shard with ZeRO-3 instead of replicating them."""
        return {}
