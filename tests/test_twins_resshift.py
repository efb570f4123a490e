"""The ResShift family's released configs train at tiny size in the modes they ship with
(configs/twins/, see tests/test_twins.py): TAD-SR on the ResShift teacher (official and the
paper's letter, fp32 as shipped and bf16 as its README suggests), ResShift teacher training in
bf16, DTKD from the decoded ResShift teacher and from the pretrained SRMDNF x4. Each twin trains
2 steps on 2 Ray workers of the shared local cluster, from a cache made by the cache job's twin.

Parts: a random tiny UNet saved as an official ``.pth`` and a random VQ-f4 in the official
``autoencoder_vq_f4.pth`` format, at full size (the autoencoder has no size keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distsr.config import CONFIG_DIR, load_yaml, planning_without_files, to_dict
from distsr.launch import run
from distsr.models.ncnn import find_ncnn_models
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import RunConfig, load_run_config
from distsr.teachers import cache_job
from tests.test_resshift_models import _random_official_vq
from tests.test_twins import allowed, leaves

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resshift_parts(tmp_path_factory) -> dict[str, Path]:
    """The twins' teacher: a random tiny UNet (official names, ``.pth``) and a random VQ-f4."""
    folder = tmp_path_factory.mktemp("twin_resshift")
    torch.manual_seed(0)
    unet = load_yaml(CONFIG_DIR / "twins" / "tadsr_resshift.yaml")["method"]["teacher"]["unet"]
    torch.save(UNetModelSwin(**unet).state_dict(), folder / "unet.pth")
    torch.save({"state_dict": _random_official_vq()}, folder / "autoencoder_vq_f4.pth")
    return {"unet_checkpoint": folder / "unet.pth",
            "autoencoder.checkpoint": folder / "autoencoder_vq_f4.pth"}  # fmt: skip


def part_overrides(parts: dict[str, Path], prefix: str) -> list[str]:
    return [f"{prefix}.{key}={path}" for key, path in parts.items()]


def cache(twin_shards: Path, out: Path, *argv: str) -> str:
    cfg = cache_job.load_config([*argv, f"shards=[{twin_shards}]", f"output={out}"])
    summary = cache_job.run_in_process(cfg)
    assert summary["failed"] == {} and summary["samples"] == 25
    return summary["cache_dir"]


def resshift_cache(parts, twin_shards, out, *extra) -> str:
    return cache(twin_shards, out, "twins/cache_resshift_realsr_x4",
                 *part_overrides(parts, "teacher"), *extra)  # fmt: skip


@pytest.fixture(scope="module")
def latent_cache(resshift_parts, twin_shards, tmp_path_factory) -> str:
    return resshift_cache(resshift_parts, twin_shards, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def decoded_cache(resshift_parts, twin_shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("cache")
    # the released DTKD config's header: decoded, with ResShift's stochastic sampler
    return resshift_cache(
        resshift_parts, twin_shards, out, "decode=true", "teacher.sampler=stochastic"
    )


def twin(name: str, tmp_path: Path, shards: Path, *extra: str) -> RunConfig:
    overrides = [f"output_dir={tmp_path}", f"data.shards=[{shards}]", *extra]
    return load_run_config(f"twins/{name}", overrides)


def mode_drift(name: str, cfg: RunConfig) -> dict[str, tuple]:
    """The keys other than sizes, paths, step counts and placement where the run's resolved
    config differs from the released one (as tests/test_twins.py tells them apart)."""
    with planning_without_files():
        shipped = leaves(to_dict(load_run_config(name)))
    ran = leaves(to_dict(cfg))
    return {".".join(k): (shipped.get(k), ran.get(k)) for k in set(shipped) | set(ran)
            if shipped.get(k) != ran.get(k) and not allowed(k)}  # fmt: skip


def assert_trained(cfg: RunConfig, exports: tuple[str, ...]) -> list[dict]:
    """2 steps run, a complete checkpoint at step 2, finite losses, the exports written."""
    final = run(cfg)
    assert final["step"] == 2 and final["skipped_samples"] == 0
    assert (cfg.run_dir / "step_00000002" / "COMPLETE").is_file()
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    losses = [r[k] for r in records for k in r if k.startswith("loss/")]
    assert losses and all(torch.isfinite(torch.tensor(losses))), records
    for name in exports:
        assert (cfg.run_dir / "export" / f"{name}.safetensors").is_file(), name
    return records


def saved_dtypes(cfg: RunConfig, engine: str) -> set[torch.dtype]:
    """The dtypes of ``engine``'s trained weights in the step-2 checkpoint (what it computed in)."""
    states = next((cfg.run_dir / "step_00000002" / engine).rglob("*model_states.pt"))
    module = torch.load(states, weights_only=False, map_location="cpu")["module"]
    return {v.dtype for v in module.values() if v.is_floating_point()}


# -- TAD-SR on the ResShift teacher: official, the paper's letter, and bf16 (the README's hint) --


@pytest.mark.parametrize(
    ("name", "extra", "drift"),
    [("tadsr_resshift", (), {}),
     ("tadsr_resshift_paper", (), {}),
     ("tadsr_resshift", ("engine.precision=bf16",), {"engine.precision": ("fp32", "bf16")})],
    ids=["official", "paper", "official-bf16"],
)  # fmt: skip
def test_tadsr_resshift_twin_trains_on_two_workers_from_the_vq_f4_cache(
    name, extra, drift, resshift_parts, latent_cache, twin_shards, tmp_path, ray_cluster
):
    cfg = twin(name, tmp_path, twin_shards, f"method.cache_dir={latent_cache}",
               *part_overrides(resshift_parts, "method.teacher"), *extra)  # fmt: skip
    assert mode_drift(name, cfg) == drift
    assert cfg.method.teacher.autoencoder.kind == "vq_f4" and cfg.scaling.num_workers == 2
    records = assert_trained(cfg, ("student", "student_ema", "disc"))
    assert all(r["distill"] > 0 for r in records)  # the 15-step teacher is not the student
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    assert saved_dtypes(cfg, "student") == saved_dtypes(cfg, "disc") == {dtype}


# -- ResShift teacher training: bf16 in the VQ-f4 latent space ----------------------------------


def test_resshift_realsr_x4_twin_trains_in_bf16_on_two_workers(
    resshift_parts, twin_shards, tmp_path, ray_cluster
):
    vq = resshift_parts["autoencoder.checkpoint"]
    cfg = twin("resshift_realsr_x4", tmp_path, twin_shards, f"method.autoencoder.checkpoint={vq}")
    assert mode_drift("resshift_realsr_x4", cfg) == {}
    assert cfg.engine.precision == "bf16" and cfg.method.autoencoder.kind == "vq_f4"
    assert_trained(cfg, ("unet", "unet_ema"))
    assert saved_dtypes(cfg, "unet") == {torch.bfloat16}


# -- DTKD: the decoded ResShift teacher into SwinIR-small; the pretrained SRMDNF into SRVGG -----


def test_dtkd_resshift_swinir_twin_trains_from_the_decoded_cache_on_two_workers(
    resshift_parts, decoded_cache, twin_shards, tmp_path, ray_cluster
):
    cfg = twin("dtkd_resshift_swinir", tmp_path, twin_shards, f"method.cache_dir={decoded_cache}",
               *part_overrides(resshift_parts, "method.teacher"))  # fmt: skip
    assert mode_drift("dtkd_resshift_swinir", cfg) == {}
    records = assert_trained(cfg, ("student", "student_ema"))
    assert [r["lambda"] for r in records] == [0.0, 0.5]  # the ramp over the whole run (N = 2)


@pytest.mark.skipif("srmdnf-x4" not in find_ncnn_models(), reason="needs the [teachers] wheels")
def test_dtkd_srmdnf_twin_trains_from_the_pretrained_srmdnf_cache_on_two_workers(
    twin_shards, tmp_path, ray_cluster
):
    files = f"method.teacher.model_files=[{find_ncnn_models()['srmdnf-x4'].param}]"
    # the released config's header: the cache job's defaults with the teacher given on the line
    cache_dir = cache(twin_shards, tmp_path / "cache", "teacher.kind=regression",
                      files.removeprefix("method."), "decode=true")  # fmt: skip
    cfg = twin("dtkd_srmdnf", tmp_path, twin_shards, files, f"method.cache_dir={cache_dir}")
    assert mode_drift("dtkd_srmdnf", cfg) == {}
    records = assert_trained(cfg, ("student", "student_ema"))
    assert [r["lambda"] for r in records] == [0.0, 0.5]
