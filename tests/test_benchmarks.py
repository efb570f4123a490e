"""The inference and loader benchmarks run end to end at tiny sizes and report what they claim."""

from __future__ import annotations

import json

import pytest
import torch

from distsr.bench.loader import BenchLoaderConfig, bench_loader
from distsr.data.config import DataConfig
from distsr.data.reader import make_train_loader
from tests.conftest import load_job


def test_bench_infer_tiny(tmp_path):
    out = tmp_path / "infer"
    result = load_job("bench_infer").main(
        ["size=tiny", "lq_size=8", "tile=4", "overlap=2", "repeats=2", "threads=1", f"output={out}"]
    )
    assert set(result["arms"]) == {"student", "teacher", "student_tiled", "teacher_tiled"}
    assert result["teacher_steps"] == 4 and result["sr"] == [32, 32]
    for arm in result["arms"].values():
        assert len(arm["seconds"]) == 2 and arm["min"] <= arm["median"] <= arm["max"]
    # 4 UNet calls against 1 on the same network and image: the ratio is real, not noise
    assert result["ratio"]["median"] > 1.5, result["ratio"]
    # pixel space: the teacher is exactly 4 UNet calls of the student's (bicubic is not counted)
    assert result["ratio"]["flop_bound"] == pytest.approx(4.0, rel=1e-9)
    assert "ratio_tiled" in result
    saved = json.loads((out / "bench_infer.json").read_text())
    assert saved["ratio"] == result["ratio"]
    assert "**teacher / student**" in (out / "bench_infer.md").read_text()


def test_bench_infer_rejects_unknown_arm(tmp_path):
    with pytest.raises(ValueError, match="arms"):
        load_job("bench_infer").main(["arms=[student,teachr]", f"output={tmp_path}"])


def test_bench_loader_tiny_input_and_joined(tmp_path):
    cfg = BenchLoaderConfig(size="tiny", stride=128, shard_size=16, workers=[0, 1], batches=4,
                            repeats=1, batch_size=4, threads=1, output=str(tmp_path))  # fmt: skip
    result = bench_loader(cfg)
    assert [(r["mode"], r["workers"]) for r in result["rows"]] == [
        ("input", 0),
        ("input", 1),
        ("joined", 0),
        ("joined", 1),
    ]
    assert all(r["samples_per_s"]["median"] > 0 for r in result["rows"])
    # the cache holds the tiny teacher's latent shapes (pixel space: 3 x 32 x 32), K = 1
    assert result["cache_shapes"] == {"z0": [1, 3, 32, 32], "z_gt": [3, 32, 32],
                                      "z_y": [3, 32, 32]}  # fmt: skip
    # and the joined reader the bench timed hands out the cache column with every batch
    from distsr.data.cache import TeacherCache

    cache = TeacherCache(next((tmp_path / "cache").iterdir()))
    data = DataConfig(shards=[str(tmp_path / "shards")], batch_size=4, shuffle=8, scale=4)
    batch = next(iter(make_train_loader(data, rank=0, world_size=1, steps=1, seed=0,
                                        cache=cache)))  # fmt: skip
    assert batch["cache"]["z0"].shape == (4, 1, 3, 32, 32)
    torch.testing.assert_close(batch["cache"]["z_gt"].float(), batch["gt"] * 2 - 1,
                               atol=1e-3, rtol=0)  # fmt: skip
