"""The ``Teacher`` interface: frozen model(s) + a sampler behind a few calls (DESIGN.md).

Images cross the interface in [0, 1]; inside, teachers work in [-1, 1] as ResShift does. A
teacher is identified by its fingerprint: a hash of its weights (every module's state_dict, in
sorted key order, with dtypes and shapes) plus the settings that change what ``sample`` returns
(sampler, schedule, scale). The teacher-output cache lives in a folder named after it, and a
cache whose fingerprint differs from the configured teacher is refused (``parts_differ``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence

import torch
from torch import nn

FINGERPRINT_DIGITS = 16  # hex digits of the fingerprint after the teacher kind


class Teacher(nn.Module):
    """A frozen multi-step teacher (METHODS.md §1-2).

    ``cond`` is the dict ``prepare`` returns; for ResShift ``{"z_y", "lq"}``: the latent of the
    bicubic-upsampled lq and the UNet condition. ``noise`` is what ``noise_for`` draws per
    sample: the prior eps ``[B, C, H, W]``, or ``[noise_draws, B, C, H, W]`` for samplers that
    need more (the prior eps first). Subclasses set ``kind`` and implement the methods below.
    """

    kind: str = "teacher"

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

    @property
    def noise_draws(self) -> int:
        """How many latent-shaped noise tensors ``sample`` consumes per sample."""
        return 1

    def prepare(self, lq: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        """The real latent z0 = E(gt) of gt images in [0, 1]."""
        raise NotImplementedError

    def prior(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_T, the start of the trajectory (and of a one-step student)."""
        raise NotImplementedError

    def sample(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z0 of the full multi-step trajectory from z_T = prior(cond, noise)."""
        raise NotImplementedError

    def denoise(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """One network call: x0_hat at step t (gradients flow to z_t; weights are frozen)."""
        raise NotImplementedError

    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """Encoder features for discriminators (TAD-SR, METHODS.md §2)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose encoder features")

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Latent -> image in [0, 1]."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict:
        """``{"kind", "weights", "sampler", "schedule", "scale"}``: JSON-able values."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_parts())


def fingerprint_of(parts: dict) -> str:
    """``<kind>-<16 hex digits>`` from the fingerprint parts (stable across processes)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(blob).hexdigest()[:FINGERPRINT_DIGITS]
    return f"{parts.get('kind', 'teacher')}-{digest}"


def hash_modules(named: Iterable[tuple[str, nn.Module | None]], extra: dict | None = None) -> str:
    """sha256 over ``extra`` (architecture settings, as sorted JSON) and every module's state
    dict in sorted key order: key, dtype, shape and raw bytes of each tensor."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name, module in named:
        h.update(f"<{name}>".encode())
        if module is None:
            continue
        state = module.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parts_differ(cached: dict, configured: dict) -> list[str]:
    """Human-readable lines naming each fingerprint part that differs (empty if none)."""
    lines = []
    for key in sorted(set(cached) | set(configured)):
        a, b = cached.get(key), configured.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sub)
        else:
            detail = f"{_short(a)} vs {_short(b)}"
        lines.append(f"{key} ({detail})")
    return lines


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "...'"
