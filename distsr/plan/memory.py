"""Per-rank memory of a workload for ZeRO stages 0-3 over N ranks (DeepSpeed's rules):

* trained engine: parameters in the engine's dtype (bf16: 2 B, fp32: 4 B), partitioned at
  ZeRO-3; gradients of the trainable parameters in that dtype, partitioned at ZeRO-2/3; AdamW
  state 2 fp32 moments (8 B) + the fp32 master copy when bf16 (4 B), partitioned at ZeRO-1/2/3;
  the EMA shadow of the trainable parameters in fp32 (4 B), full on every rank (engine/ema.py);
* the frozen teacher in its own dtype: replicated, or 1/N per rank with
  ``method.teacher_partition=zero3``; other frozen parts (first stage) replicated.

Not included: CUDA context, allocator fragmentation, DeepSpeed's communication buckets,
temporary buffers (gathered ZeRO-3 layers, attention workspaces).
"""

from __future__ import annotations

import math

import torch

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def param_counts(module: torch.nn.Module) -> dict:
    """numel of all parameters, of the trainable ones, and their bytes as built."""
    params = list(module.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "bytes": sum(p.numel() * p.element_size() for p in params),
    }


def engine_bytes(counts: dict, precision: str, stage: int, world: int, ema: bool) -> dict:
    """Per-rank bytes of one trained engine."""
    w = DTYPE_BYTES[precision]
    opt = 8 + (4 if precision == "bf16" or stage >= 1 else 0)  # moments + fp32 master
    part = lambda x, s: x / world if stage >= s else x  # noqa: E731
    return {
        "params": part(counts["params"] * w, 3),
        "grads": part(counts["trainable"] * w, 2),
        "optimizer": part(counts["trainable"] * opt, 1),
        "ema": counts["trainable"] * 4 if ema else 0,
    }


def frozen_bytes(counts: dict, world: int, partitioned: bool) -> float:
    return counts["bytes"] / world if partitioned else counts["bytes"]


def memory_plan(workload, cfg, world: int, activations: int) -> dict:
    """``{"stages": {0..3: {part: bytes}}, "nets": {name: counts}}`` per rank."""
    nets = {n: param_counts(net.module) for n, net in workload.nets.items()}
    zero3_teacher = getattr(cfg.method, "teacher_partition", "replicate") == "zero3"
    stages = {}
    for stage in range(4):
        parts = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "ema": 0.0, "frozen": 0.0}
        for name, net in workload.nets.items():
            if net.role == "trained":
                b = engine_bytes(nets[name], cfg.engine.precision, stage, world, net.ema)
                for key, value in b.items():
                    parts[key] += value
            else:
                parts["frozen"] += frozen_bytes(
                    nets[name], world, net.role == "teacher" and zero3_teacher
                )
        parts["activations"] = activations
        parts["total"] = sum(parts.values())
        stages[stage] = {k: math.ceil(v) for k, v in parts.items()}
    return {
        "stages": stages,
        "nets": nets,
        "teacher_partition": "zero3" if zero3_teacher else "replicate",
    }
