"""The plan of a config as one dict (written as JSON; ``table.format_plan`` prints it)."""

from __future__ import annotations

from dataclasses import asdict

from distsr.config import planning_without_files
from distsr.plan.bytes import cache_sample_bytes, shard_sample_bytes
from distsr.plan.flops import count_calls, peak_saved
from distsr.plan.hardware import DEFAULT_MFU, peak_flops
from distsr.plan.memory import memory_plan
from distsr.plan.workload import build_workload
from distsr.runconfig import load_run_config

ACTIVATIONS = (
    "bytes autograd saves for backward in the step's grad-enabled forwards, measured "
    "on meta (parameters excluded; peak over the updates: a graph lives until its "
    "update's backward); not included: a checkpointed block's recompute, workspaces"
)


def load(config: str, overrides: list[str]):
    """The ``RunConfig`` as ``launch --dry-run`` resolves it: absent weight files are listed."""
    with planning_without_files() as missing:
        cfg = load_run_config(config, overrides)
    return cfg, list(missing)


def teacher_precision(cfg) -> str:
    dtype = getattr(getattr(cfg.method, "teacher", None), "dtype", "float32")
    return "bf16" if dtype in ("bfloat16", "float16") else "fp32"


def count_workload(w) -> dict:
    """FLOPs of every call list of a workload (one memo: a shared forward is counted once)."""
    modules = {name: net.module for name, net in w.nets.items()}
    seen: dict = {}
    step, cache, infer_t, infer_s = (
        count_calls(calls, modules, seen)
        for calls in (w.step, w.cache_sample, w.infer_teacher, w.infer_student)
    )
    step_flops = sum(c.total for c in step)
    return {
        "step_per_rank": step_flops,
        "step_per_sample": step_flops / w.batch,
        "step_calls": [asdict(c) for c in step],
        "cache_per_sample": sum(c.total for c in cache),
        "cache_calls": [asdict(c) for c in cache],
        "infer_teacher_per_image": sum(c.total for c in infer_t),
        "infer_student_per_image": sum(c.total for c in infer_s),
        "activations": peak_saved(w.step, {c.label: c for c in step}),
    }


def projection(cfg, flops: dict, gpus: int, gpu: str, mfu: float, samples: int) -> dict:
    """Step time = FLOPs per rank / (peak x MFU); the cache job at the teacher's dtype."""
    rate = peak_flops(gpu, cfg.engine.precision) * mfu
    step_s = flops["step_per_rank"] / rate
    cache_rate = peak_flops(gpu, teacher_precision(cfg)) * mfu
    return {
        "peak_tflops": rate / mfu / 1e12,
        "step_seconds": step_s,
        "steps_per_s": 1 / step_s,
        "max_steps": cfg.engine.max_steps,
        "train_gpu_hours": cfg.engine.max_steps * step_s * gpus / 3600,
        "train_wall_hours": cfg.engine.max_steps * step_s / 3600,
        "cache_gpu_hours": samples * flops["cache_per_sample"] / cache_rate / 3600,
        "cache_precision": teacher_precision(cfg),
    }


def bytes_plan(cfg, w, samples: int, steps_per_s: float) -> dict:
    shard = shard_sample_bytes(w.gt_size, cfg.data.scale)
    cached = cache_sample_bytes(w.cache_fields) if w.cache_fields else None
    read = shard["bytes"] + (cached["bytes"] if cached else 0)
    return {
        "shard_per_sample": shard,
        "cache_per_sample": cached,
        "shards_total": shard["bytes"] * samples,
        "cache_total": cached["bytes"] * samples if cached else 0,
        "read_per_rank_per_s": read * w.batch * steps_per_s,
    }


def make_plan(
    config: str,
    overrides: list[str],
    gpus: int,
    gpu: str,
    mfu: float = DEFAULT_MFU,
    samples: int | None = None,
) -> dict:
    """The plan of ``config`` + ``overrides`` on ``gpus`` x ``gpu`` (see docs/plan.md)."""
    cfg, missing = load(config, overrides)
    w = build_workload(cfg.name, cfg)
    flops = count_workload(w)
    samples = samples or cfg.engine.max_steps * w.batch * gpus
    proj = projection(cfg, flops, gpus, gpu, mfu, samples)
    memory = memory_plan(w, cfg, gpus, flops.pop("activations"))
    return {
        "config": config,
        "overrides": overrides,
        "name": cfg.name,
        "recipe": cfg.recipe,
        "gpus": gpus,
        "gpu": gpu,
        "mfu": mfu,
        "samples": samples,
        "batch_per_rank": w.batch,
        "gt_size": w.gt_size,
        "precision": cfg.engine.precision,
        "flops": flops,
        "memory": {**memory, "activations_estimate": ACTIVATIONS},
        "bytes": bytes_plan(cfg, w, samples, proj["steps_per_s"]),
        "projection": proj,
        "notes": w.notes,
        "missing_files": [list(m) for m in missing],
    }
