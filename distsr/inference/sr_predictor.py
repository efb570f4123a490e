"""Single-pass SR students (DTKD / MTKD runs, any ``models.sr`` network) as predictors:
``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*scale,w*scale] in [0,1]``, as ``inference.predictors``.

A KD run exports its student under the official key names (``export/student[_ema].safetensors``)
and records the network in ``config.yaml`` (``method.student``, a ``models.sr.StudentConfig``).
``inference.predictors.load_predictor`` reaches :func:`sr_predictor` through its family table;
the network is rebuilt from the config (so settings a file cannot tell, e.g. EDSR's
``res_scale``, are the run's) and the export loaded strictly.
"""

from __future__ import annotations

import torch
from torch import nn


class SRNet:
    """A single-pass SR network ``net(lq) -> sr`` at ``scale``, output clamped to [0, 1]."""

    steps = 1

    def __init__(self, net: nn.Module, scale: int):
        self.net = net.eval().requires_grad_(False)
        self.scale = int(scale)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        return self.net(lq.to(self.device, torch.float32)).float().clamp(0, 1)


def sr_predictor(weights, student, cfg_path, steps="one", device="cpu", seed=0, sampler=None):
    """An :class:`SRNet` of ``student`` (a ``StudentConfig``) with ``weights`` loaded strictly;
    the signature of ``inference.predictors.PREDICTORS`` (``steps``: a single pass either way;
    ``seed`` and ``sampler`` do not apply)."""
    from distsr.models.sr import build_sr
    from distsr.models.sr.loader import load_strict, read_sr_state_dict

    net = build_sr(student.arch, student.preset, scale=student.scale, **student.kwargs)
    net = load_strict(net, read_sr_state_dict(weights), f"{weights} (student of {cfg_path})")
    return SRNet(net.to(device), student.scale)
