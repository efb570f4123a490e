"""Explicit name -> builder registries. Entries are ``"module:attr"`` strings, imported on use,
so that listing names never imports torch-heavy modules."""

from __future__ import annotations

import importlib

RECIPES: dict[str, str] = {
    "resshift": "distsr.recipes.resshift:ResShiftRecipe",
    "tadsr": "distsr.recipes.tadsr:TadsrRecipe",
    "dtkd": "distsr.recipes.dtkd:DtkdRecipe",
    "mtkd_aggregator": "distsr.recipes.mtkd:AggregatorRecipe",
    "mtkd": "distsr.recipes.mtkd:MtkdRecipe",
    "fkdiff_pretrain": "distsr.recipes.fkdiff:PretrainRecipe",
    "fkdiff_prior": "distsr.recipes.fkdiff:PriorRecipe",
    "fkdiff": "distsr.recipes.fkdiff:PHexKDRecipe",
}

# teacher config ``kind`` -> builder ``(cfg, device) -> Teacher``
TEACHERS: dict[str, str] = {
    "resshift": "distsr.teachers.resshift:build_teacher",
    "regression": "distsr.teachers.sr:build_regression_teachers",
    "aggregated": "distsr.teachers.sr:build_aggregated_teacher",
    "seesr": "distsr.teachers.seesr:build_seesr_teacher",
    "fkdiff": "distsr.teachers.fkdiff:build_fkdiff_teacher",
}

# offline job -> the typed config its YAML is loaded into (``config.load_job_config``)
JOB_CONFIGS: dict[str, str] = {
    "cache_teacher": "distsr.teachers.config:CacheJobConfig",
    "make_shards": "distsr.data.config:ShardsConfig",
    "demo": "distsr.demo:DemoConfig",
    "bench_kd": "distsr.bench.kd:BenchKDConfig",
    "bench_compile": "distsr.bench.compile:BenchCompileConfig",
}


def lookup(registry: dict[str, str], name: str, kind: str):
    """Import and return the object registered as ``name``; unknown names list the valid ones."""
    if name not in registry:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {valid}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_recipe(name: str):
    return lookup(RECIPES, name, "recipe")


def build_teacher(cfg, device):
    """The teacher a config describes, by its ``kind``."""
    return lookup(TEACHERS, cfg.kind, "teacher kind")(cfg, device)
