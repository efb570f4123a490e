"""``PixelOutputs(teacher)``: any teacher with its outputs decoded to images (DTKD, METHODS.md
§3: "ResShift-15, outputs decoded to pixels").

``sample`` is ``teacher.decode(teacher.sample(cond, noise))``, ``encode_gt`` / ``decode`` are the
identity on images in [0, 1]; the condition, the stored entries and the noise are the wrapped
teacher's, so the cache job stores decoded images (and, for ResShift, ``z_y``) from the same
seeded noise, and a student that only sees pixels trains from that cache. The fingerprint is the
wrapped teacher's parts under ``{"kind": "pixels"}``: a decoded cache never passes for a latent
one.
"""

from __future__ import annotations

import torch

from distsr.teachers.base import Teacher


class PixelOutputs(Teacher):
    kind = "pixels"

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher
        self.stored = tuple(teacher.stored)
        self.noise_tensors = teacher.noise_tensors
        if len(teacher.outputs) != 1:
            raise ValueError(f"PixelOutputs decodes one output; {teacher.kind} has "
                             f"{teacher.outputs}")  # fmt: skip
        self.freeze()

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        return self.teacher.prepare(lq, stored)

    def noise_shape(self, cond: dict):
        return self.teacher.noise_shape(cond)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's output from the same noise, as an image in [0, 1]."""
        return self.teacher.decode(self.teacher.sample(cond, noise)).float()

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return gt.to(self.device, torch.float32)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return z0.float().clamp(0, 1)

    def fingerprint_parts(self) -> dict:
        return {"kind": self.kind, "teacher": self.teacher.fingerprint_parts()}
