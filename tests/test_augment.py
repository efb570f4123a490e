"""``data.augment``: random flips/rotations applied alike to lq, gt and the cached teacher
targets (a real multi-teacher cache of real shards, read by the real reader), drawn from the
run's seed (reproducible, resumable), off by default, refused for latent caches."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch

from distsr.config import ConfigError, planning_without_files
from distsr.data.augment import ELEMENTS, draw, transform
from distsr.data.cache import TeacherCache
from distsr.data.config import AugmentConfig, DataConfig
from distsr.data.reader import iter_samples, make_train_loader
from distsr.runconfig import load_run_config
from distsr.teachers import MultiTeacher
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.pixels import PixelOutputs
from tests.test_cache_targets import job_cfg, regression, write_odd_shards
from tests.test_teacher_cache import subset_shards

BOTH = AugmentConfig(hflip=True, rot90=True)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 elements of D4 on ``x [..., H, W]``, written with torch.rot90 / torch.flip only."""
    dims = (-2, -1)
    return [torch.rot90(x, k, dims) for k in range(4)] + [
        torch.rot90(x.flip(-1), k, dims) for k in range(4)
    ]


@pytest.fixture(scope="module")
def inputs(tiny_shards, tmp_path_factory):
    """2 shards x 8 samples (32x32 gt, 8x8 lq)."""
    return subset_shards(tiny_shards, tmp_path_factory.mktemp("aug") / "shards", 2, 8)


@pytest.fixture(scope="module")
def multi_cache(inputs, tmp_path_factory) -> TeacherCache:
    """Two regression teachers' outputs (MTKD stage 1's cache: one column per teacher)."""
    teacher = MultiTeacher({"a": regression(0), "b": regression(1)})
    summary = run_in_process(job_cfg(inputs, tmp_path_factory.mktemp("cache")), teacher)
    return TeacherCache(summary["cache_dir"])


def read(inputs, steps: int, cache=None, state=None, **kw) -> tuple[list[dict], dict]:
    cfg = DataConfig(shards=[str(inputs)], batch_size=4, shuffle=8, **kw)
    loader = make_train_loader(cfg, rank=0, world_size=1, steps=steps, seed=3, cache=cache,
                               state=state)  # fmt: skip
    return list(loader), loader.state_dict()


def test_lq_gt_and_every_cached_target_get_the_same_dihedral_element(inputs, multi_cache):
    plain, _ = read(inputs, 4, multi_cache)
    augmented, _ = read(inputs, 4, multi_cache, augment=BOTH)
    seen = collections.Counter()
    for want, got in zip(plain, augmented, strict=True):
        assert want["__key__"] == got["__key__"]  # the draw leaves the sample order alone
        for i in range(len(want["__key__"])):
            matches = [
                k for k, t in enumerate(dihedral(want["lq"][i])) if torch.equal(t, got["lq"][i])
            ]
            assert len(matches) == 1, matches  # photo crops have no symmetry
            k = matches[0]
            seen[k] += 1
            assert torch.equal(dihedral(want["gt"][i])[k], got["gt"][i])
            for name in ("z0.a", "z0.b", "z_gt"):  # [K, 3, H, W] and [3, H, W]
                assert torch.equal(dihedral(want["cache"][name][i])[k], got["cache"][name][i])
            assert torch.equal(want["cache"]["seed"][i], got["cache"]["seed"][i])
    assert len(seen) >= 4, seen  # 16 samples: several elements, not one fixed transform


def test_the_draw_covers_d4_uniformly_and_is_a_function_of_the_seed(inputs, multi_cache):
    x = torch.arange(20.0).reshape(4, 5)  # not square: transpose shows in the shape too
    images = {as_key(transform(x, e)) for e in ELEMENTS}
    assert len(images) == 8 and images == {as_key(t) for t in dihedral(x)}  # all of D4
    counts = collections.Counter(draw(BOTH, seed) for seed in range(4000))
    assert set(counts) == set(ELEMENTS)
    assert all(abs(n - 500) < 5 * 500**0.5 for n in counts.values()), counts  # p = 1/8 each
    assert [draw(BOTH, s) for s in range(50)] == [draw(BOTH, s) for s in range(50)]
    assert {draw(AugmentConfig(hflip=True), s) for s in range(50)} == {ELEMENTS[0], ELEMENTS[4]}
    # the loader: the same stream twice, and a resume continues it exactly
    first, _ = read(inputs, 4, multi_cache, augment=BOTH)
    again, _ = read(inputs, 4, multi_cache, augment=BOTH)
    head, state = read(inputs, 2, multi_cache, augment=BOTH)
    tail, _ = read(inputs, 2, multi_cache, state=state, augment=BOTH)
    for a, b in zip(first, again, strict=True):
        assert_batches_equal(a, b)
    for a, b in zip(first, head + tail, strict=True):
        assert_batches_equal(a, b)


def as_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.flatten().tolist())


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a["__key__"] == b["__key__"]
    for name in ("lq", "gt"):
        assert torch.equal(a[name], b[name]), name
    for name in ("z0.a", "z0.b", "z_gt"):
        assert torch.equal(a["cache"][name], b["cache"][name]), name


def test_off_by_default_on_in_the_mtkd_presets_and_refused_for_latent_caches(inputs, tmp_path):
    assert not DataConfig().augment.enabled
    stored = {s["__key__"]: s for s in iter_samples(str(inputs))}
    for batch in read(inputs, 2)[0]:  # the default reader: the samples as stored
        for i, key in enumerate(batch["__key__"]):
            assert torch.equal(batch["lq"][i], stored[key]["lq"])
            assert torch.equal(batch["gt"][i], stored[key]["gt"])
    with planning_without_files():
        for name in ("mtkd_aggregator", "mtkd_swinir_light", "mtkd_rcan_light",
                     "mtkd_edsr_baseline"):  # fmt: skip
            assert load_run_config(name).data.augment == BOTH, name
        assert not load_run_config("tadsr_seesr").data.augment.enabled
    # which caches may be flipped with their images: decided by the teacher's fingerprint parts
    assert TeacherCache.create(
        tmp_path / "p",
        PixelOutputs(regression()).fingerprint_parts(),
        noise_seed=0,
        draws=1,
        outputs=["z0"],
        stored=[],
    ).image_space
    for kind in ("resshift", "seesr"):
        latent = TeacherCache.create(tmp_path / kind, {"kind": kind, "weights": "w"}, noise_seed=0,
                                     draws=1, outputs=["z0"], stored=["z_y"])  # fmt: skip
        assert not latent.image_space
        with pytest.raises(ConfigError, match="latent-space targets"):
            read(inputs, 1, latent, augment=BOTH)
    odd = write_odd_shards(tmp_path / "odd", 1, 4)  # 7x5: a transpose cannot be batched
    cfg = dataclasses.replace(DataConfig(shards=[str(odd)], scale=1, shuffle=0), augment=BOTH)
    with pytest.raises(ValueError, match="needs square crops"):
        list(make_train_loader(cfg, rank=0, world_size=1, steps=4, seed=0))


def test_the_equivariance_measure_tells_an_equivariant_teacher_from_one_that_is_not():
    from torch import nn

    from distsr.evaluate.equivariance import equivariance_gap, photo_pairs
    from distsr.teachers import RegressionTeacher

    pairs = photo_pairs(32)[:3]
    nearest = RegressionTeacher(nn.Upsample(scale_factor=4, mode="nearest"), 4, "nearest")
    exact = equivariance_gap(nearest, pairs)
    assert all(exact[n] == float("inf") for n in exact if n != "teacher_psnr")
    up = [
        (lq.double().repeat_interleave(4, -1).repeat_interleave(4, -2), gt) for _, lq, gt in pairs
    ]
    mse = [((sr - gt.double()) ** 2).mean().item() for sr, gt in up]
    want = sum(10 * math.log10(1 / m) for m in mse) / len(mse)
    assert abs(exact["teacher_psnr"] - want) < 1e-9
    gap = equivariance_gap(regression(), pairs)  # a random conv is not flip-equivariant
    means = [gap[n] for n in gap if n not in ("teacher_psnr", "worst")]
    assert len(means) == 7 and 0 < gap["worst"] <= min(means) < 60
