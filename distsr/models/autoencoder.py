"""First-stage autoencoders of latent diffusion SR: the frozen VQ-f4 of ResShift, or an identity
"pixel" autoencoder for tiny configs and tests. Images are in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distsr.config import missing_file  # also imported from here by recipes and teachers


@dataclass
class AutoencoderConfig:
    kind: Literal["pixel", "vq_f4"] = "vq_f4"
    checkpoint: str | None = None  # official autoencoder_vq_f4.pth (required for vq_f4)

    def validate(self):
        if self.kind == "vq_f4" and not self.checkpoint:
            return [("checkpoint", "vq_f4 needs the path of the official autoencoder_vq_f4.pth")]
        return missing_file("checkpoint", self.checkpoint if self.kind == "vq_f4" else None)


class PixelAutoencoder(torch.nn.Module):
    """Identity first stage: the latent is the image in [-1, 1] (tiny configs and tests)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class VQAutoencoder(torch.nn.Module):
    """Frozen VQ-f4: encode without quantisation, decode with quantisation (official semantics)."""

    def __init__(self, checkpoint: str | None = None, vq: torch.nn.Module | None = None):
        super().__init__()
        from distsr.models.vq import vq_from_official

        if (checkpoint is None) == (vq is None):
            raise ValueError("VQAutoencoder needs either an official checkpoint or a VQModel")
        vq = vq if vq is not None else vq_from_official(checkpoint)
        self.vq = vq.requires_grad_(False).eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        from distsr.models.vq import vq_encode

        return vq_encode(self.vq, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        from distsr.models.vq import vq_decode

        return vq_decode(self.vq, z)


def build_autoencoder(cfg: AutoencoderConfig) -> torch.nn.Module:
    return PixelAutoencoder() if cfg.kind == "pixel" else VQAutoencoder(cfg.checkpoint)
