"""The teacher cache without Ray (the job's library run in-process): every teacher kind round-trips
(cached targets == live targets), the cache is refused for other input shards under the same
names, the stochastic sampler's prior eps survives any latent shape, and ``draws: K`` stores K
trajectories that training picks among."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from distsr.data.cache import TeacherCache
from distsr.data.config import DataConfig
from distsr.data.reader import iter_samples, make_train_loader
from distsr.models.resshift_unet import UNetModelSwin
from distsr.teachers import MultiTeacher, RegressionTeacher, build_teacher
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.noise import noise_for, sample_seed
from distsr.teachers.source import CachedTeacher, LiveTeacher
from tests.conftest import load_job
from tests.test_teacher_cache import BATCH, TINY_UNET, rewrite, subset_shards, tar_keys, teacher_cfg

# the job and the live teacher run the same kernels on one thread (bit-equal targets)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinySR(nn.Module):
    """A one-forward x4 SR net: conv -> pixel shuffle -> sigmoid."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3 * 16, 3, padding=1)
        self.up = nn.PixelShuffle(4)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.conv(lq)))


def regression(seed: int = 0) -> RegressionTeacher:
    return RegressionTeacher(TinySR(seed), scale=4, arch="tiny")


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "unet.safetensors"
    save_file(UNetModelSwin(**TINY_UNET).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tiny_shards, tmp_path_factory) -> Path:
    """2 shards x 8 samples (32x32 gt, 8x8 lq), no manifest."""
    return subset_shards(tiny_shards, tmp_path_factory.mktemp("in") / "shards", 2, 8)


def job_cfg(shards, output: Path, **kw) -> CacheJobConfig:
    return CacheJobConfig(shards=[str(shards)], output=str(output), batch_size=BATCH, **kw)


def loader_for(shards, cache: TeacherCache, steps: int, **kw):
    """No shuffle, batches of the job's size: each batch is one batch of the job."""
    cfg = DataConfig(shards=[str(shards)], **{"batch_size": BATCH, "shuffle": 0, **kw})
    return make_train_loader(cfg, rank=0, world_size=1, steps=steps, seed=0, cache=cache)


def assert_same(want, got, where: str) -> None:
    if isinstance(want, dict):
        assert set(want) == set(got), where
        for name in want:
            assert_same(want[name], got[name], f"{where}.{name}")
    elif want is None:
        assert got is None, where
    else:
        assert torch.equal(want, got), where


def assert_live_equals_cached(teacher, cache: TeacherCache, shards, steps: int, **kw) -> list:
    live = LiveTeacher(teacher, seed=cache.noise_seed, fresh_noise=False)
    source = CachedTeacher(cache, teacher)
    batches = list(loader_for(shards, cache, steps, **kw))
    for batch in batches:
        assert_same(live.targets(batch), source.targets(batch), "targets")
    return batches


# ---------------------------------------------------------------- cache validity


def test_cache_of_shards_a_is_refused_for_shards_b_with_the_same_keys(inputs, tmp_path):
    """No manifest in the shard folders: the shards' sha256 decides."""
    teacher = regression()
    summary = run_in_process(job_cfg(inputs, tmp_path / "cache"), teacher)
    cache = TeacherCache(summary["cache_dir"])
    names = sorted(p.name for p in inputs.iterdir())
    other = tmp_path / "b"
    other.mkdir()
    shutil.copy(inputs / names[0], other / names[0])  # the same bytes in another folder: fine

    def flip(i, sample):  # another lq for sample 3, same key
        if i == 3:
            img = Image.open(io.BytesIO(sample["lq.png"])).transpose(Image.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sample["lq.png"] = buf.getvalue()

    rewrite(inputs / names[1], other / names[1], flip)
    assert tar_keys(other / names[1]) == tar_keys(inputs / names[1])
    assert loader_for(other / names[0], cache, steps=1).steps == 1
    with pytest.raises(
        ValueError, match="made from other input shards under the same names"
    ) as err:
        loader_for(other, cache, steps=1)
    message = str(err.value)
    assert str(inputs / names[1]) in message and str(other / names[1]) in message
    assert f"cache shard {names[0]}" not in message  # only the shard that differs is named
    with pytest.raises(ValueError, match="already holds cache shards of other input shards"):
        run_in_process(job_cfg(other, tmp_path / "cache"), teacher)  # no silent overwrite


def test_cache_is_refused_for_shards_of_another_shards_manifest(photos_dir, tmp_path):
    """Shard folders written by make_shards: their manifest fingerprints are compared."""
    make_shards = load_job("make_shards")
    base = [f"inputs=[{photos_dir / 'astronaut.png'}]", "crop_size=32", "stride=64",
            "shard_size=64", "shuffle=false"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    make_shards.main([*base, f"output={a}"])
    make_shards.main([*base, f"output={b}", "degradation.kind=realesrgan"])
    assert tar_keys(a / "train-000000.tar") == tar_keys(b / "train-000000.tar")
    summary = run_in_process(job_cfg(a, tmp_path / "cache"), regression())
    cache = TeacherCache(summary["cache_dir"])
    assert cache.manifest()["shards"]["train-000000.tar"]["input"]["shards_fingerprint"]
    assert loader_for(a, cache, steps=1).steps == 1
    with pytest.raises(ValueError, match="shards fingerprint") as err:
        loader_for(b, cache, steps=1)
    assert str(a / "train-000000.tar") in str(err.value)
    assert str(b / "train-000000.tar") in str(err.value)


# ---------------------------------------------------------------- the stochastic sampler


def write_odd_shards(out: Path, shards: int, per_shard: int) -> Path:
    """Shards of 5x7 gt with lq = gt (scale 1): a pixel-space latent of shape (3, 5, 7)."""
    out.mkdir()
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar"), encoder=False) as sink:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(buf, "PNG")
                png = buf.getvalue()
                sink.write({"__key__": f"odd_{s}_{i}", "gt.png": png, "lq.png": png,
                            "meta.json": json.dumps({}).encode()})  # fmt: skip
    return out


def test_stochastic_sampler_cache_at_latent_shape_3_5_7_equals_the_live_teacher(
    unet_ckpt, tmp_path
):
    unet = {**TINY_UNET, "image_size": 5, "lq_size": 5, "channel_mult": [1],
            "num_res_blocks": [1], "attention_resolutions": [], "window_size": 1}  # fmt: skip
    torch.manual_seed(0)
    ckpt = tmp_path / "odd.safetensors"
    save_file(UNetModelSwin(**unet).state_dict(), str(ckpt))
    spec = teacher_cfg(unet_ckpt, "teacher.sampler=stochastic")
    spec = dataclasses.replace(spec, unet=unet, unet_checkpoint=str(ckpt), scale=1)
    shards = write_odd_shards(tmp_path / "odd", 2, 8)
    summary = run_in_process(job_cfg(shards, tmp_path / "cache", teacher=spec))
    assert summary["failed"] == {} and summary["samples"] == 16
    cache = TeacherCache(summary["cache_dir"])
    teacher = build_teacher(spec)
    assert teacher.noise_tensors == 5  # the prior eps + one per step
    batches = assert_live_equals_cached(teacher, cache, shards, steps=4, scale=1)
    keys = batches[0]["__key__"]
    eps = CachedTeacher(cache, teacher).targets(batches[0])["noise"]
    assert eps.shape == (BATCH, 3, 5, 7)
    assert torch.equal(eps, noise_for(keys, (3, 5, 7), seed=0, tensors=5)[0])
    # one randn of all 5 tensors at once would give another prior eps (3*5*7 = 105 is not a
    # multiple of 16): the test can tell the fixed rule from the old one
    gen = torch.Generator().manual_seed(sample_seed(0, keys[0]))
    assert not torch.equal(torch.randn((5, 3, 5, 7), generator=gen)[0], eps[0])


# ---------------------------------------------------------------- other teacher kinds


def test_regression_teacher_cache_round_trips(inputs, tmp_path):
    teacher = regression()
    summary = run_in_process(job_cfg(inputs, tmp_path / "cache"), teacher)
    cache = TeacherCache(summary["cache_dir"])
    assert (cache.outputs, cache.stored, cache.fields) == (("z0",), (), ("z0", "z_gt"))
    batches = assert_live_equals_cached(teacher, cache, inputs, steps=4)
    got = CachedTeacher(cache, teacher).targets(batches[0])
    assert got["noise"] is None and got["z0_tch"].shape == (BATCH, 3, 32, 32)
    assert torch.equal(got["z_gt"], batches[0]["gt"].half().float())
    with pytest.raises(ValueError, match=r"differ in: weights"):
        CachedTeacher(cache, regression(seed=1))


def test_multi_teacher_cache_stores_one_output_per_teacher(inputs, unet_ckpt, tmp_path):
    teacher = MultiTeacher({"swinir": regression(), "resshift": build_teacher(
        teacher_cfg(unet_ckpt))})  # fmt: skip
    summary = run_in_process(job_cfg(inputs, tmp_path / "cache"), teacher)
    cache = TeacherCache(summary["cache_dir"])
    assert cache.outputs == ("z0.swinir", "z0.resshift") and cache.stored == ("resshift.z_y",)
    batches = assert_live_equals_cached(teacher, cache, inputs, steps=4)
    got = CachedTeacher(cache, teacher).targets(batches[0])
    assert set(got["z0_tch"]) == {"z0.swinir", "z0.resshift"}
    assert not torch.equal(got["z0_tch"]["z0.swinir"], got["z0_tch"]["z0.resshift"])
    assert got["noise"].shape == (BATCH, 3, 32, 32)
    with pytest.raises(ValueError, match="differ in"):
        cache.check(regression())


# ---------------------------------------------------------------- noise diversity


def test_draws_store_k_trajectories_and_training_picks_among_them(inputs, unet_ckpt, tmp_path):
    teacher = build_teacher(teacher_cfg(unet_ckpt))
    summary = run_in_process(job_cfg(inputs, tmp_path / "cache", draws=2), teacher)
    cache = TeacherCache(summary["cache_dir"])
    assert cache.draws == 2
    batches = list(loader_for(inputs, cache, steps=4))
    live = LiveTeacher(teacher, seed=0, fresh_noise=False)
    shape = (3, 32, 32)
    for batch in batches:  # both trajectories stored, each from its own seeded z_T
        column, keys = batch["cache"], batch["__key__"]
        assert column["z0"].shape == (BATCH, 2, *shape) and column["seed"].shape == (BATCH, 2)
        assert column["seed"].tolist() == [[sample_seed(0, k, d) for d in (0, 1)] for k in keys]
        cond = teacher.prepare(batch["lq"], stored={"z_y": column["z_y"].float()})
        for d in (0, 1):
            want = live.sample(cond, noise_for(keys, shape, seed=0, draw=d))["z0"]
            assert torch.equal(column["z0"][:, d], want)
        assert not torch.equal(column["z0"][:, 0], column["z0"][:, 1])

    def picks(generator=None) -> list[int]:
        source, out = CachedTeacher(cache, teacher, generator=generator), []
        for batch in batches:
            got, column, keys = source.targets(batch), batch["cache"], batch["__key__"]
            for b, key in enumerate(keys):
                d = next(d for d in (0, 1) if torch.equal(got["z0_tch"][b], column["z0"][b, d]))
                eps = noise_for([key], shape, seed=0, draw=d)[0]
                assert torch.equal(got["noise"][b], eps)  # the picked trajectory's prior eps
                out.append(d)
        return out

    first = picks(torch.Generator().manual_seed(7))
    assert set(first) == {0, 1}  # 16 picks
    assert picks(torch.Generator().manual_seed(7)) == first
    torch.manual_seed(3)  # default: the process RNG, which the trainer seeds
    from_process = picks()
    torch.manual_seed(3)
    assert picks() == from_process


def test_live_teacher_draws_fresh_noise_per_step(inputs, unet_ckpt):
    teacher = build_teacher(teacher_cfg(unet_ckpt))
    samples = list(iter_samples(str(inputs / "train-000000.tar")))[:2]
    batch = {"lq": torch.stack([s["lq"] for s in samples]),
             "gt": torch.stack([s["gt"] for s in samples]),
             "__key__": [s["__key__"] for s in samples]}  # fmt: skip
    live = LiveTeacher(teacher, seed=0)
    torch.manual_seed(0)
    first, second = live.targets(batch), live.targets(batch)
    assert not torch.equal(first["noise"], second["noise"])
    assert not torch.equal(first["z0_tch"], second["z0_tch"])
    torch.manual_seed(0)
    assert_same(first, live.targets(batch), "targets")  # deterministic given the seed
    seeded = LiveTeacher(teacher, seed=0, fresh_noise=False).targets(batch)
    assert torch.equal(seeded["noise"], noise_for(batch["__key__"], (3, 32, 32), seed=0))
