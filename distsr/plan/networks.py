"""The networks of a config built on the meta device: shapes and code of the real modules, no
weights read. Architectures come from the config (ResShift) or, for SeeSR, from the release's
``config.json`` files when present, else the published SD-2-base layout (stated)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from distsr.models.autoencoder import PixelAutoencoder, VQAutoencoder
from distsr.models.resshift import ResShift, ResShiftSpec
from distsr.models.resshift_unet import UNetModelSwin

META = torch.device("meta")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resshift_model(spec: ResShiftSpec) -> ResShift:
    """``ResShift`` of ``spec`` on meta: its UNet and first stage (VQ-f4 or pixel), no weights."""
    from distsr.models.vq import build_vq_f4

    with META:
        unet = UNetModelSwin(**copy.deepcopy(spec.unet))
        if spec.autoencoder.kind == "pixel":
            first_stage = PixelAutoencoder()
        else:
            first_stage = VQAutoencoder(vq=build_vq_f4())
    return ResShift(spec, unet=unet, autoencoder=first_stage)


def _release_config(folder: str | None, name: str) -> dict | None:
    path = Path(folder).expanduser() / name / "config.json" if folder else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def seesr_denoiser(cfg) -> tuple[torch.nn.Module, str]:
    """SeeSR's UNet + ControlNet (``SeeSRDenoiser``) on meta in the teacher's dtype, and where
    the architecture came from."""
    from distsr.models.seesr import (
        SD2_BASE_UNET_CONFIG,
        SeeSRControlNet,
        SeeSRUNet,
        controlnet_config,
    )
    from distsr.teachers.seesr import SeeSRDenoiser, enable_checkpointing

    unet_cfg = _release_config(cfg.seesr_dir, "unet")
    cn_cfg = _release_config(cfg.seesr_dir, "controlnet")
    source = f"{cfg.seesr_dir}/{{unet,controlnet}}/config.json"
    if unet_cfg is None or cn_cfg is None:
        unet_cfg, cn_cfg = SD2_BASE_UNET_CONFIG, controlnet_config(SD2_BASE_UNET_CONFIG)
        source = "the published SD-2-base layout (models.seesr.SD2_BASE_UNET_CONFIG)"
    with META:
        unet = SeeSRUNet.from_config(unet_cfg)
        controlnet = SeeSRControlNet.from_config(cn_cfg)
    denoiser = SeeSRDenoiser(unet, controlnet, cfg.conditioning_scale).to(DTYPES[cfg.dtype])
    if cfg.gradient_checkpointing:
        enable_checkpointing(denoiser)
    return denoiser.requires_grad_(False).eval(), source


def seesr_student(cfg, denoiser: torch.nn.Module) -> torch.nn.Module:
    """The TAD-SR student by ``SeeSRTeacher.make_student``'s own rule (a copy of UNet +
    ControlNet; only the modules named in ``student_trainable`` train)."""
    from types import SimpleNamespace

    from distsr.teachers.seesr import SeeSRTeacher

    return SeeSRTeacher.make_student(SimpleNamespace(denoiser=denoiser, cfg=cfg))
