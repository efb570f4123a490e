"""Learning-rate schedules: linear warm-up then constant / cosine / linear decay / step decay."""

from __future__ import annotations

import math

import torch

from distsr.engine.config import SchedulerConfig


def lr_factor(cfg: SchedulerConfig, step: int, max_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        return cfg.gamma ** (step // cfg.step_every)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.kind == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: SchedulerConfig, max_steps: int, lr_scale: float = 1.0):
    """``lr_scale``: an elastic run's batch rule (``engine/elastic.py``). It lives in the
    schedule's function, which checkpoints do not hold, so a run resumed at another world size
    gets the scale of its new size (``refresh_lr``), not the saved one."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_scale * lr_factor(cfg, s, max_steps)
    )


def refresh_lr(scheduler) -> None:
    """Set each group's lr from the schedule at its current step (after a checkpoint load, whose
    optimizer state carries the lr of the world size it was saved at)."""
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                               scheduler.lr_lambdas, strict=True):  # fmt: skip
        group["lr"] = base * fn(scheduler.last_epoch)
