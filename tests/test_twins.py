"""Test what we ship: every released config trains at tiny size in the modes it ships with.

A twin (``configs/twins/<name>.yaml``) is its released config with ``defaults: [<name>]`` and only
networks, data, paths, step counts and placement shrunk; ``test_twin_differs_only_in_sizes``
holds every twin to that, so a mode (precision, a teacher's dtype, ZeRO stage, teacher
partition, gradient checkpointing, EMA, clipping, schedules, loss weights) cannot drift. The
twins train on 2 Ray workers of one shared local cluster (tests below and in
``test_twins_*.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distsr.config import CONFIG_DIR, from_dict, load_yaml, planning_without_files, to_dict
from distsr.launch import run
from distsr.registry import JOB_CONFIGS, lookup
from distsr.runconfig import load_run_config, parse_run_config
from distsr.schema import schema_name
from distsr.teachers import cache_job
from distsr.teachers.seesr_tiny import write_tiny_seesr
from tests.test_seesr_launch import path_overrides

TWIN_DIR = CONFIG_DIR / "twins"
TWINS = sorted(p.stem for p in TWIN_DIR.glob("*.yaml"))

# What a twin may change. A leaf key is allowed when its last part is one of these...
SIZES = {"process_size", "image_size", "lq_size", "gt_size", "batch_size", "levels",
         "time_embed_dim", "hidden", "logit_channels", "steps",  # steps: sampler's
         # widths and depths: MTKD's aggregator (DCTSwin) and students' build_sr kwargs (RCAN,
         # EDSR, SwinIR), FKdiff's restorer, CFE, prior denoiser and FASRer students
         "channels", "blocks", "n_feats", "n_resgroups", "n_resblocks", "num_feat", "num_block",
         "embed_dim", "depths", "dim", "refinement_blocks", "prior_channels", "res_blocks", "width",
         "patch_size"}  # fmt: skip
PATHS = {"name", "output_dir", "output", "shards", "sd2_dir", "seesr_dir", "checkpoint", "dape",
         "tag_list", "tag_thresholds", "unet_checkpoint", "cache_dir", "model_files",
         "restorer_checkpoint", "prior_checkpoint"}  # fmt: skip
STEPS = {"max_steps", "log_every", "preview_every", "every_steps",
         "end_step"}  # fmt: skip  # end_step: the KD ramp's N, = max_steps as released
PLACEMENT = {"num_workers", "use_gpu", "cpus_per_worker", "shuffle", "num_actors",
             "cpus_per_actor"}  # fmt: skip
# ... or it lies under a network's architecture (sizes only: the tiny networks' constructors)
ARCHITECTURES = {"unet", "ram_model"}
# a mode under an allowed last part's name: the losses' and optimizer's kinds, the wavelet levels
# J / K of the KD loss and FDD's paired layers
NOT_ALLOWED = {("engine", "checkpoint", "keep"), ("engine", "optimizer", "name"),
               ("method", "kd_loss", "name"), ("method", "kd_loss", "levels"),
               ("method", "fdd", "levels")}  # fmt: skip


def leaves(node, prefix=()) -> dict[tuple, object]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in leaves(sub, (*prefix, key)).items()}
    return {prefix: node}


def resolved(path: Path) -> dict:
    """The config as a launch or job sees it: merged with its defaults, typed, every default
    filled in (so a default changed by a twin shows too)."""
    data = load_yaml(path)
    with planning_without_files():
        if "recipe" in data:
            return to_dict(parse_run_config(data, source=str(path)))
        job = lookup(JOB_CONFIGS, schema_name(path), "job")
        return to_dict(from_dict(job, data, source=str(path)))


def allowed(key: tuple) -> bool:
    if key in NOT_ALLOWED or "schedule" in key[:-1]:  # a diffusion schedule's T is a mode
        return False
    last = key[-1]
    return last in SIZES | PATHS | STEPS | PLACEMENT or bool(ARCHITECTURES & set(key[:-1]))


@pytest.mark.parametrize("name", TWINS)
def test_twin_differs_only_in_sizes_paths_and_step_counts(name):
    twin_path = TWIN_DIR / f"{name}.yaml"
    raw = yaml.safe_load(twin_path.read_text())
    assert raw["defaults"] == [name], "a twin shrinks exactly the released config of its name"
    released, twin = leaves(resolved(CONFIG_DIR / f"{name}.yaml")), leaves(resolved(twin_path))
    assert set(twin) == set(released) or all(allowed(k) for k in set(twin) ^ set(released))
    drift = {".".join(map(str, k)): (released.get(k), twin.get(k)) for k in released
             if twin.get(k) != released[k] and not allowed(k)}  # fmt: skip
    assert not drift, f"twins/{name}.yaml changes more than sizes, paths and steps: {drift}"


def test_the_drift_check_can_fail():
    """A twin that turned bf16 off or changed the teacher's partition would be caught."""
    for key in [("engine", "precision"), ("method", "teacher", "dtype"), ("engine", "zero_stage"),
                ("method", "teacher_partition"), ("engine", "ema_decay"),
                ("engine", "checkpoint", "keep"), ("method", "teacher", "gradient_checkpointing"),
                ("method", "disc", "kwargs", "zero_init_modulation"),
                ("method", "teacher", "schedule", "steps"),
                ("method", "schedule", "steps")]:  # fmt: skip
        assert not allowed(key), key


def first_step(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


# -- tadsr_seesr: the users' command, bf16 everywhere, ZeRO-3 bf16 teacher, 2 workers ------------


@pytest.fixture(scope="module")
def seesr_parts(tmp_path_factory) -> dict:
    return write_tiny_seesr(tmp_path_factory.mktemp("twin_seesr"))


def seesr_cache(parts: dict, shards: Path, out: Path, *extra: str) -> str:
    cfg = cache_job.load_config(["twins/cache_seesr", f"shards=[{shards}]", f"output={out}",
                                 *path_overrides(parts, "teacher"), *extra])  # fmt: skip
    summary = cache_job.run_in_process(cfg)
    assert summary["failed"] == {} and summary["samples"] > 0
    return summary["cache_dir"]


def seesr_twin(tmp_path, parts, shards, cache_dir, *extra):
    return load_run_config("twins/tadsr_seesr", [
        f"output_dir={tmp_path}", f"data.shards=[{shards}]", f"method.cache_dir={cache_dir}",
        *path_overrides(parts, "method.teacher"), *extra])  # fmt: skip


# bf16 vs fp32 at step 1 (same initial weights, data and noise): bf16 keeps 8 significant bits
# (unit roundoff u = 2^-8); the cached teacher targets (a bf16 teacher's 2-step sampler), the
# student's, the teacher's and the discriminator's forwards each round at every layer, and the
# losses are means of squares and hinges of those outputs. 32 u = 2^-3 relative bounds that for
# networks this shallow (test_precision.py measures single bf16 engines against the same bound).
BF16_REL = 2.0**-3


@pytest.mark.slow
def test_tadsr_seesr_twin_trains_in_bf16_with_the_zero3_teacher_on_two_workers(
    seesr_parts, twin_shards, tmp_path, ray_cluster
):
    bf16_cache = seesr_cache(seesr_parts, twin_shards, tmp_path / "cache")
    cfg = seesr_twin(tmp_path / "bf16", seesr_parts, twin_shards, bf16_cache)
    assert (cfg.engine.precision, cfg.method.teacher.dtype) == ("bf16", "bfloat16")
    assert cfg.method.teacher_partition == "zero3" and cfg.scaling.num_workers == 2
    assert run(cfg)["step"] == 2
    bf16_run = cfg.run_dir
    assert (bf16_run / "step_00000002" / "COMPLETE").is_file()
    assert (bf16_run / "export" / "student_ema.safetensors").is_file()

    fp32_cache = seesr_cache(seesr_parts, twin_shards, tmp_path / "cache",
                             "teacher.dtype=float32")  # fmt: skip
    fp32 = seesr_twin(tmp_path / "fp32", seesr_parts, twin_shards, fp32_cache,
                      "engine.precision=fp32", "method.teacher.dtype=float32")  # fmt: skip
    assert run(fp32)["step"] == 2
    low, ref = first_step(bf16_run), first_step(fp32.run_dir)
    for key in ("loss/disc", "loss/student", "distill", "adv_g"):
        assert abs(low[key] - ref[key]) <= BF16_REL * abs(ref[key]) + 1e-6, (key, low, ref)
