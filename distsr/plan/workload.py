"""What one run computes, as network calls on the meta device: the networks of the recipe
(``Net``), the calls of one training step in order (``Call``, with each update's backward as
``Backward``), the calls per cached teacher sample and per inference image, and the cache fields.

Each ``recipes/*.py`` has a builder here that lists the calls its ``training_step`` makes
(tests/test_plan.py runs the real ``training_step`` under ``FlopCounterMode`` and compares).
The step is planned as trained from the teacher cache (what the configs' comments run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from distsr.plan.networks import META

Grad = Literal["none", "params", "input"]


@dataclass
class Net:
    module: nn.Module
    role: Literal["trained", "teacher", "frozen"]  # teacher: frozen, ZeRO-3 partitionable
    ema: bool = False


@dataclass
class Call:
    """One forward of ``net``. ``grad``: "none" (no_grad), "params" (a trained engine's forward;
    backward reaches its trainable parameters), "input" (a frozen net that gradients flow
    through to its input, no weight gradients). ``run(needs_grad)`` makes its inputs on meta
    (requiring grad when ``needs_grad``) and returns the output(s)."""

    label: str
    net: str
    grad: Grad
    run: Callable[[bool], object]
    update: str | None = None  # the Update whose backward frees its graph
    times: int = 1  # identical calls in a row (a sampler's steps)


@dataclass
class Backward:
    update: str


@dataclass
class Workload:
    config: str
    recipe: str
    batch: int  # micro-batch per rank
    gt_size: int
    nets: dict[str, Net]
    step: list  # Call | Backward, in training_step's order
    cache_sample: list[Call] = field(default_factory=list)  # per cached sample (batch 1)
    infer_teacher: list[Call] = field(default_factory=list)  # per image at gt_size
    infer_student: list[Call] = field(default_factory=list)
    cache_fields: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    draws: int = 1
    notes: list[str] = field(default_factory=list)


def meta(*shape: int, grad: bool = False, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(shape, device=META, dtype=dtype).requires_grad_(grad)


def steps_t(batch: int, t: int) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long, device=META)


def default_gt_size(cfg) -> tuple[int, str]:
    """data.gt_size, else the crop the teacher works at (the shards' stored crop size is not
    known without the shards): ResShift unet.image_size x the first stage's factor, SeeSR
    process_size."""
    if cfg.data.gt_size:
        return cfg.data.gt_size, "data.gt_size"
    teacher = getattr(cfg.method, "teacher", cfg.method)
    if getattr(teacher, "kind", "resshift") == "seesr":
        return teacher.process_size, "method.teacher.process_size (data.gt_size=null)"
    factor = 1 if teacher.autoencoder.kind == "pixel" else 4
    return teacher.unet["image_size"] * factor, "unet.image_size x first-stage factor"


def build_workload(name: str, cfg) -> Workload:
    """The workload of a parsed ``RunConfig``; recipes without a builder are named."""
    from distsr.plan import recipes

    builder = recipes.BUILDERS.get(cfg.recipe)
    if builder is None:
        raise ValueError(
            f"distsr.plan has no workload for recipe {cfg.recipe!r} yet; planned "
            f"recipes: {', '.join(sorted(recipes.BUILDERS))}"
        )
    return builder(name, cfg)
