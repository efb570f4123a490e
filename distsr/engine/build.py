"""Build one DeepSpeed engine per trainable module, with a torch optimizer (no JIT build)."""

from __future__ import annotations

import dataclasses

import deepspeed
import torch
from torch import nn

from distsr.engine.config import EngineConfig, OptimizerConfig, SchedulerConfig
from distsr.engine.context import DistContext
from distsr.engine.deepspeed_config import deepspeed_config
from distsr.engine.schedule import build_scheduler


def engine_config(cfg: EngineConfig, overrides: dict | None = None) -> EngineConfig:
    """The engine config one trainable module gets (``Recipe.optimizer_overrides``): top-level
    keys replace ``optimizer`` fields (e.g. ``{"lr": 1e-4}``); ``scheduler`` holds fields of its
    own LR schedule, e.g. ``{"scheduler": {"kind": "constant", "warmup_steps": 0}}``: the base
    lr from the first step while the other engines warm up (TAD-SR's official discriminator)."""
    if not overrides:
        return cfg
    opt = dict(overrides)
    sched = dict(opt.pop("scheduler", None) or {})
    problems = _unknown_keys(opt, OptimizerConfig, "") + _unknown_keys(
        sched, SchedulerConfig, "scheduler."
    )
    if not problems:
        cfg = dataclasses.replace(
            cfg,
            optimizer=dataclasses.replace(cfg.optimizer, **opt),
            scheduler=dataclasses.replace(cfg.scheduler, **sched),
        )
        problems = [f"{k}: {m}" for k, m in cfg.optimizer.validate()]
        problems += [f"scheduler.{k}: {m}" for k, m in cfg.scheduler.validate()]
    if problems:
        raise ValueError("bad per-engine optimizer overrides: " + "; ".join(problems))
    return cfg


def _unknown_keys(values: dict, cls: type, prefix: str) -> list[str]:
    valid = [f.name for f in dataclasses.fields(cls)]
    return [f"{prefix}{k}: unknown (valid: {', '.join(valid)})" for k in values if k not in valid]


def build_optimizer(module: nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_engine(
    module: nn.Module, cfg: EngineConfig, micro_batch: int, ctx: DistContext, overrides=None
):
    """A DeepSpeed engine around ``module``; the LR schedule steps with the engine.
    ``overrides`` changes the optimizer and LR schedule of this engine only (``engine_config``)."""
    cfg = engine_config(cfg, overrides)
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    module = module.to(ctx.device)
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch, ctx.world_size),
    )
    return engine


def gathered(engine):
    """Context in which every parameter of ``engine`` is whole (a no-op below ZeRO-3)."""
    params = list(engine.module.parameters())
    return deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3)


def build_frozen_engine(module: nn.Module, micro_batch: int, ctx: DistContext):
    """A frozen module partitioned with ZeRO-3 across the ranks (no optimizer): each rank holds
    1/world of its weights and gathers a layer's weights for its forward. Forwards become
    collective, so every rank must run the same ones. Kept in fp32."""
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=module.to(ctx.device), config=config)
    engine.eval()
    return engine
