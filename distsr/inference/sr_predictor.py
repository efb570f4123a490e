"""Single-pass SR students (DTKD / MTKD runs, any ``models.sr`` network) as predictors:
``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*scale,w*scale] in [0,1]``, as ``inference.predictors``.

A KD run exports its student under the official key names (``export/student[_ema].safetensors``)
and records the network in ``config.yaml`` (``method.student``, a ``recipes.kd.StudentConfig``).
:func:`load_sr_predictor` rebuilds that network from the config (so settings a file cannot tell,
e.g. EDSR's ``res_scale``, are the run's) and loads the export strictly.
"""

from __future__ import annotations

from pathlib import Path

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


def sr_student_config(cfg_path: str | Path):
    """The ``method.student`` (``StudentConfig``) of a run's config.yaml, or None when the run
    trains no single-pass SR student. Files the config names (cache, teachers) may be gone."""
    from distsr.config import planning_without_files
    from distsr.recipes.kd import StudentConfig
    from distsr.runconfig import load_run_config

    with planning_without_files():
        cfg = load_run_config(str(cfg_path))
    student = getattr(cfg.method, "student", None)
    return student if isinstance(student, StudentConfig) else None


def is_sr_run(run_dir_or_weights: str | Path, config: str | Path | None = None) -> bool:
    """Whether a run folder (or a weights file + ``config``) holds a single-pass SR student."""
    path = Path(run_dir_or_weights).expanduser()
    cfg_path = Path(config) if config is not None else None
    if cfg_path is None:
        run_dir = path if path.is_dir() else path.parent
        run_dir = run_dir.parent if run_dir.name == "export" else run_dir
        cfg_path = run_dir / "config.yaml"
    return cfg_path.is_file() and sr_student_config(cfg_path) is not None


def sr_predictor(weights, student, cfg_path, steps="one", device="cpu", seed=0, sampler=None):
    """An :class:`SRNet` of ``student`` (a ``StudentConfig``) with ``weights`` loaded strictly;
    the signature of ``inference.predictors.PREDICTORS`` (``steps``: a single pass either way;
    ``seed`` and ``sampler`` do not apply)."""
    from distsr.models.sr import build_sr
    from distsr.models.sr.loader import load_strict, read_sr_state_dict

    net = build_sr(student.arch, student.preset, scale=student.scale, **student.kwargs)
    net = load_strict(net, read_sr_state_dict(weights), f"{weights} (student of {cfg_path})")
    return SRNet(net.to(device), student.scale)


def load_sr_predictor(
    run_dir_or_weights: str | Path,
    which: str = "ema",
    *,
    config: str | Path | None = None,
    device: str | torch.device | None = None,
) -> SRNet:
    """The student of a KD run folder (``config.yaml`` + ``export/student[_ema].safetensors``),
    or of a weights file plus the run's ``config``; ``which``: "ema" or "raw" weights."""
    from distsr.inference.predictors import _locate

    weights, cfg_path = _locate(Path(run_dir_or_weights).expanduser(), which, config, "student")
    student = sr_student_config(cfg_path)
    if student is None:
        raise ValueError(f"{cfg_path}: the run trains no single-pass SR student "
                         "(method.student of a DTKD / MTKD recipe)")  # fmt: skip
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return sr_predictor(weights, student, cfg_path, device=device)
