"""Test what we ship: the released MTKD and FKdiff configs train at tiny size in the modes they
ship with (their twins in configs/twins/, held to sizes, paths and step counts by
``tests/test_twins.py``), each stage chained to the next as a user runs them:

    MTKD:   cache_mtkd_teachers -> mtkd_aggregator -> cache_mtkd_aggregated -> 3 students
    FKdiff: fkdiff_pretrain -> fkdiff_prior -> cache_fkdiff -> fkdiff_phexkd

Each upstream stage is a module fixture (it runs once); each training twin runs 2 steps on 2
Ray workers of the shared local cluster. The caches are the job's in-process path over the 25
twin crops."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distsr.config import CONFIG_DIR, to_dict
from distsr.engine.checkpoint import step_name
from distsr.launch import run
from distsr.models.sr import build_sr
from distsr.runconfig import RunConfig, load_run_config
from distsr.teachers import cache_job
from tests.test_twins import allowed, leaves, resolved

# the shipped modes of this family that a twin must never change (the drift check's allowlist
# lets none of them through; test_twins.py holds every twin to it)
KD_MODES = [("method", "task_weight"), ("method", "kd_weight"), ("method", "kd_loss", "name"),
            ("method", "kd_loss", "levels"), ("method", "kd_loss", "transform"),
            ("method", "student", "arch"), ("method", "student", "preset"),
            ("method", "student", "scale"), ("method", "aggregator", "mean_skip"),
            ("method", "aggregator", "mlp_ratio"), ("method", "net", "layernorm"),
            ("method", "net", "bias"), ("method", "net", "ffn_expansion"),
            ("method", "prior", "timesteps"), ("method", "prior", "beta_end"),
            ("method", "fdd", "eta"), ("method", "fdd", "lam"), ("method", "fdd", "levels"),
            ("method", "distill"), ("teacher", "kind"), ("draws",), ("engine", "grad_clip"),
            ("engine", "optimizer", "name"), ("engine", "optimizer", "lr"),
            ("engine", "scheduler", "kind"), ("engine", "scheduler", "gamma"),
            ("engine", "ema_decay")]  # fmt: skip


def test_the_drift_check_lets_no_kd_mode_through():
    for key in KD_MODES:
        assert not allowed(key), key


def assert_shipped_modes(cfg: RunConfig, name: str) -> None:
    """Every key of the run's resolved config that is no size, path, step count or placement
    equals the released config's (the modes the run trained in are the shipped ones)."""
    released = leaves(resolved(CONFIG_DIR / f"{name}.yaml"))
    ran = leaves(to_dict(cfg))
    drift = {k: (released.get(k), ran.get(k)) for k in released.keys() | ran.keys()
             if not allowed(k) and ran.get(k) != released.get(k)}  # fmt: skip
    assert not drift, f"{name}: the twin's run left the shipped modes: {drift}"


def assert_trained(cfg: RunConfig, final: dict, name: str, exports: set[str]) -> list[dict]:
    """The run of the twin of ``name`` reached max_steps in the shipped modes, left a COMPLETE
    checkpoint of its last step, logged finite losses at every step and exported ``exports``."""
    assert cfg.scaling.ray and cfg.scaling.num_workers == 2
    assert final["step"] == cfg.engine.max_steps == 2
    assert_shipped_modes(cfg, name)
    assert (cfg.run_dir / step_name(2) / "COMPLETE").is_file()
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        losses = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert losses and all(math.isfinite(v) for v in losses.values()), record
    assert exports <= {p.name for p in (cfg.run_dir / "export").iterdir()}
    return records


def trains_in_bf16(cfg: RunConfig) -> None:
    """The same run with every engine in bf16 (engine/precision.py), in process: it trains to
    the end with finite losses. (Only tadsr_seesr and resshift_realsr_x4 ship bf16; this checks
    the rule holds for the KD and FKdiff recipes too.)"""
    bf16 = replace(cfg, name=f"{cfg.name}_bf16", engine=replace(cfg.engine, precision="bf16"),
                   scaling=replace(cfg.scaling, ray=False, num_workers=1))  # fmt: skip
    assert run(bf16)["step"] == bf16.engine.max_steps
    for line in (bf16.run_dir / "metrics.jsonl").read_text().splitlines():
        losses = {k: v for k, v in json.loads(line).items() if k.startswith("loss/")}
        assert losses and all(math.isfinite(v) for v in losses.values()), line


def twin(name: str, root: Path, shards: Path, *overrides: str) -> RunConfig:
    return load_run_config(f"twins/{name}", [f"output_dir={root}", f"data.shards=[{shards}]",
                                             *overrides])  # fmt: skip


def cache(name: str, shards: Path, out: Path, *overrides: str) -> str:
    """configs/twins/<name>.yaml's job, in process; the cache folder it wrote."""
    cfg = cache_job.load_config([f"twins/{name}", f"shards=[{shards}]", f"output={out}",
                                 *overrides])  # fmt: skip
    summary = cache_job.run_in_process(cfg)
    assert summary["failed"] == {} and summary["samples"] == 25, summary
    return summary["cache_dir"]


# -- MTKD: the three teachers' outputs cached, the aggregator, mt_hr cached, the students -------


@pytest.fixture(scope="module")
def mtkd_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("twin_mtkd")


@pytest.fixture(scope="module")
def mtkd_teachers(mtkd_root) -> str:
    """Tiny random-weight files of the released teachers' architectures (SwinIR classical,
    RCAN, EDSR large), their official key names: the override naming them."""
    torch.manual_seed(0)
    nets = {"swinir.pth": build_sr("swinir", "classical", embed_dim=12, depths=[2], num_heads=[2]),
            "rcan.pt": build_sr("rcan", "full", n_feats=16, n_resgroups=1, n_resblocks=1),
            "edsr.pt": build_sr("edsr", "large", num_feat=8, num_block=1)}  # fmt: skip
    for file, net in nets.items():
        torch.save(net.state_dict(), mtkd_root / file)
    return f"model_files=[{','.join(str(mtkd_root / f) for f in nets)}]"


@pytest.fixture(scope="module")
def mtkd_aggregator(mtkd_root, mtkd_teachers, twin_shards, ray_cluster) -> tuple:
    teachers_cache = cache("cache_mtkd_teachers", twin_shards, mtkd_root / "cache",
                           f"teacher.{mtkd_teachers}")  # fmt: skip
    assert Path(teachers_cache).name.startswith("multi-")  # one column per teacher file
    cfg = twin("mtkd_aggregator", mtkd_root, twin_shards, f"method.cache_dir={teachers_cache}",
               f"method.teachers.{mtkd_teachers}")  # fmt: skip
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def mtkd_aggregated(mtkd_root, mtkd_teachers, mtkd_aggregator, twin_shards) -> list[str]:
    """The aggregated teacher's mt_hr cached: the overrides that point a student twin at it."""
    cfg, _ = mtkd_aggregator
    teacher = [mtkd_teachers, f"checkpoint={cfg.run_dir / 'export' / 'aggregator.safetensors'}"]
    cache_dir = cache("cache_mtkd_aggregated", twin_shards, mtkd_root / "cache",
                      *[f"teacher.{t}" for t in teacher])  # fmt: skip
    assert Path(cache_dir).name.startswith("aggregated-")
    return [f"method.cache_dir={cache_dir}", *[f"method.teacher.{t}" for t in teacher]]


@pytest.mark.slow
def test_mtkd_aggregator_twin_trains_on_two_workers(mtkd_aggregator):
    cfg, final = mtkd_aggregator
    assert len(cfg.method.teachers.model_files) == 3
    assert_trained(cfg, final, "mtkd_aggregator", {"aggregator.safetensors"})
    trains_in_bf16(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mtkd_rcan_light", "mtkd_edsr_baseline", "mtkd_swinir_light"])
def test_mtkd_student_twin_distils_the_cached_mt_hr_on_two_workers(
    name, mtkd_root, mtkd_aggregated, twin_shards
):
    cfg = twin(name, mtkd_root, twin_shards, *mtkd_aggregated)
    records = assert_trained(cfg, run(cfg), name, {"student.safetensors"})  # no EMA: as shipped
    # the logged loss is Eq. 4 with the released weights (float32 sums of float32 terms)
    shipped = resolved(CONFIG_DIR / f"{name}.yaml")["method"]
    for r in records:
        want = shipped["task_weight"] * r["task"] + shipped["kd_weight"] * r["kd"]
        assert math.isfinite(want) and math.isclose(r["loss/student"], want, rel_tol=2.0**-20), r
    if name == "mtkd_rcan_light":
        trains_in_bf16(cfg)


# -- FKdiff: stage 1, stage 2 from its export, Z_hat cached, PHexKD ------------------------------


@pytest.fixture(scope="module")
def fkdiff_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("twin_fkdiff")


@pytest.fixture(scope="module")
def fkdiff_pretrain(fkdiff_root, twin_shards, ray_cluster) -> tuple:
    cfg = twin("fkdiff_pretrain", fkdiff_root, twin_shards)
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def fkdiff_prior(fkdiff_root, fkdiff_pretrain, twin_shards) -> tuple:
    stage1 = fkdiff_pretrain[0].run_dir / "export" / "restorer_ema.safetensors"
    cfg = twin("fkdiff_prior", fkdiff_root, twin_shards, f"method.restorer_checkpoint={stage1}")
    return cfg, run(cfg)


@pytest.mark.slow
def test_fkdiff_pretrain_twin_trains_on_two_workers(fkdiff_pretrain):
    assert_trained(*fkdiff_pretrain, "fkdiff_pretrain", {"restorer_ema.safetensors"})
    trains_in_bf16(fkdiff_pretrain[0])


@pytest.mark.slow
def test_fkdiff_prior_twin_trains_on_two_workers(fkdiff_prior):
    assert_trained(*fkdiff_prior, "fkdiff_prior", {"prior_ema.safetensors"})
    trains_in_bf16(fkdiff_prior[0])


@pytest.mark.slow
def test_fkdiff_phexkd_twin_distils_the_cached_prior_on_two_workers(
    fkdiff_root, fkdiff_prior, twin_shards
):
    cfg, _ = fkdiff_prior
    files = [f"restorer_checkpoint={cfg.method.restorer_checkpoint}",
             f"prior_checkpoint={cfg.run_dir / 'export' / 'prior_ema.safetensors'}"]  # fmt: skip
    cache_dir = cache("cache_fkdiff", twin_shards, fkdiff_root / "cache",
                      *[f"teacher.{f}" for f in files])  # fmt: skip
    assert Path(cache_dir).name.startswith("fkdiff-")
    cfg = twin("fkdiff_phexkd", fkdiff_root, twin_shards, f"method.cache_dir={cache_dir}",
               *[f"method.teacher.{f}" for f in files])  # fmt: skip
    exports = {"student_ema.safetensors", "student_l.safetensors", "fdd.safetensors"}
    assert_trained(cfg, run(cfg), "fkdiff_phexkd", exports)
    trains_in_bf16(cfg)
