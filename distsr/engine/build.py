"""Build one DeepSpeed engine per trainable module, with a torch optimizer (no JIT build)."""

from __future__ import annotations

import dataclasses

import deepspeed
import torch
from torch import nn

from distsr.engine.config import EngineConfig, OptimizerConfig, SchedulerConfig
from distsr.engine.context import DistContext
from distsr.engine.deepspeed_config import deepspeed_config
from distsr.engine.precision import compute_dtype, computes_in, map_tensors, module_dtype
from distsr.engine.schedule import build_scheduler


def engine_config(cfg: EngineConfig, overrides: dict | None = None) -> EngineConfig:
    """The engine config one trainable module gets (``Recipe.optimizer_overrides``): top-level
    keys replace ``optimizer`` fields (e.g. ``{"lr": 1e-4}``); ``scheduler`` holds fields of its
    own LR schedule, e.g. ``{"scheduler": {"kind": "constant", "warmup_steps": 0}}``: the base
    lr from the first step while the other engines warm up (TAD-SR's official discriminator);
    ``grad_clip`` replaces ``engine.grad_clip`` for this engine (None or 0: no clipping, e.g.
    TAD-SR's discriminator, which the official code never clips)."""
    if not overrides:
        return cfg
    opt = dict(overrides)
    clip = {"grad_clip": opt.pop("grad_clip")} if "grad_clip" in opt else {}
    sched = dict(opt.pop("scheduler", None) or {})
    problems = _unknown_keys(opt, OptimizerConfig, "") + _unknown_keys(
        sched, SchedulerConfig, "scheduler."
    )
    if not problems:
        cfg = dataclasses.replace(
            cfg,
            optimizer=dataclasses.replace(cfg.optimizer, **opt),
            scheduler=dataclasses.replace(cfg.scheduler, **sched),
            **clip,
        )
        problems = [f"{k}: {m}" for k, m in cfg.optimizer.validate()]
        problems += [f"scheduler.{k}: {m}" for k, m in cfg.scheduler.validate()]
        problems += [f"{k}: {m}" for k, m in cfg.validate() if k == "grad_clip"]
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
    module: nn.Module,
    cfg: EngineConfig,
    micro_batch: int,
    ctx: DistContext,
    overrides=None,
    lr_scale: float = 1.0,
):
    """A DeepSpeed engine around ``module``; the LR schedule steps with the engine.
    ``overrides`` changes the optimizer and LR schedule of this engine only (``engine_config``);
    ``lr_scale`` multiplies its schedule (an elastic run's batch rule, ``engine/elastic.py``)."""
    cfg = engine_config(cfg, overrides)
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    # the precision rule (engine/precision.py): the module computes in engine.precision's dtype
    module = computes_in(module.to(ctx.device), compute_dtype(cfg.precision))
    if cfg.channels_last:
        in_channels_last(module)
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.max_steps, lr_scale)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch, ctx.world_size),
    )
    undo_warmup_step(engine.optimizer)
    return compiled(engine, cfg)


@torch.no_grad()
def undo_warmup_step(optimizer) -> None:
    """bf16 at ZeRO-0: DeepSpeed's ``FP16_UnfusedOptimizer`` runs the torch optimizer once with
    zero gradients when it is built (``initialize_optimizer_states``), so AdamW's step count
    starts at 1 (bias correction one step late: the first update is 0.744 lr) and weight decay
    has already shrunk the fp32 master weights once. Forget that step: empty state, masters
    copied back from the (untouched) model weights. ZeRO 1-3 build their state without a step."""
    fp16_groups, fp32_groups = (getattr(optimizer, k, None) for k in ("fp16_groups", "fp32_groups"))
    inner = getattr(optimizer, "optimizer", None)
    if not fp16_groups or not fp32_groups or inner is None or hasattr(optimizer, "bit16_groups"):
        return
    inner.state.clear()
    for low, masters in zip(fp16_groups, fp32_groups):
        for p, master in zip(low, masters):
            master.copy_(p.float())


def compiled(engine, cfg: EngineConfig | None):
    """``engine.compile: true``: torch.compile the engine's module in place (DeepSpeed's
    ``engine.compile`` with ``engine.compile_backend``), so the recipe's calls, ``plain``
    forwards, state-dict keys, checkpoints and exports stay as they are."""
    if cfg is not None and cfg.compile:
        engine.compile(backend=cfg.compile_backend)
    return engine


def in_channels_last(module: nn.Module) -> nn.Module:
    """``engine.channels_last: true``: ``module`` runs in channels_last memory format inside,
    plain NCHW outside. Its 4-D float inputs are made channels_last on entry (convolutions then
    keep their activations in it) and its outputs contiguous again on exit, so the recipe's
    ``randn_like`` draws and losses see the same tensors as without the option. Parameters stay
    NCHW: DeepSpeed broadcasts them as flat bytes and ZeRO flattens them."""
    module.register_forward_pre_hook(
        lambda _m, args, kwargs: (_layout(args, True), _layout(kwargs, True)), with_kwargs=True
    )
    module.register_forward_hook(lambda _m, _args, out: _layout(out, False))
    return module


def _layout(value, last: bool):
    """``value`` (tensors, possibly in tuples, lists or dicts) with its 4-D float tensors in
    channels_last (``last``) or contiguous memory format."""
    fmt = torch.channels_last if last else torch.contiguous_format

    def convert(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=fmt) if x.dim() == 4 and x.is_floating_point() else x

    return map_tensors(value, convert)


def gathered(engine, params=None):
    """Context in which every parameter of ``engine`` (or only ``params``, some of them) is whole
    (a no-op below ZeRO-3)."""
    params = list(engine.module.parameters() if params is None else params)
    return deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3)


def build_frozen_engine(
    module: nn.Module, micro_batch: int, ctx: DistContext, cfg: EngineConfig | None = None
):
    """A frozen module partitioned with ZeRO-3 across the ranks (no optimizer): each rank holds
    1/world of its weights and gathers a layer's weights for its forward. Forwards become
    collective, so every rank must run the same ones. It computes in the dtype it was built in
    (a teacher's ``dtype``), under the engines' precision rule; ``cfg`` (``compile``,
    ``channels_last``) applies as to the trainable engines."""
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    dtype = module_dtype(module)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }
    module = computes_in(module.to(ctx.device), dtype)
    if cfg is not None and cfg.channels_last:
        in_channels_last(module)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return compiled(engine, cfg)
