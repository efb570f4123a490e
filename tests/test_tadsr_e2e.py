"""TAD-SR end to end on the real stack: a tiny random-weight ResShift teacher, shards from real
photos, DeepSpeed engines for the student and the discriminator."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from distsr.config import CONFIG_DIR, load_yaml
from distsr.launch import run
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import load_run_config
from tests.conftest import load_job, tiny_overrides
from tests.test_twins import BF16_REL, first_step

pytestmark = pytest.mark.slow


def tiny_unet_kwargs() -> dict:
    return load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"]


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNetModelSwin(**tiny_unet_kwargs())
    path = tmp_path_factory.mktemp("teacher") / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def tadsr_cfg(tmp_path, shards, teacher_weights, *extra):
    return load_run_config(
        "tadsr_tiny",
        tiny_overrides(
            tmp_path, shards, f"method.teacher.unet_checkpoint={teacher_weights}",
            "scaling.ray=false", "scaling.num_workers=1", "engine.zero_stage=0",
            "engine.log_every=1", *extra,
        ),
    )  # fmt: skip


def test_live_teacher_trains_student_and_discriminator_and_resumes_both(
    tiny_shards, teacher_weights, tmp_path
):
    base = ["name=live", "engine.checkpoint.every_steps=2"]
    first = run(tadsr_cfg(tmp_path, tiny_shards, teacher_weights, *base, "engine.max_steps=2"))
    assert first["step"] == 2
    ckpt = tmp_path / "live" / "checkpoints" / "step_00000002"
    assert (ckpt / "disc").is_dir() and (ckpt / "student").is_dir()  # the discriminator is saved
    second = run(tadsr_cfg(tmp_path, tiny_shards, teacher_weights, *base, "engine.max_steps=4"))
    assert second["step"] == 4
    lines = (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss/disc", "loss/student"))
        # the one-step student (a copy of the teacher's denoiser) is not the 4-step teacher:
        # zero only if the target were the student's own output or the term were dropped
        assert r["distill"] > 0 and "adv_g" in r
    assert (tmp_path / "live" / "export" / "student_ema.safetensors").exists()
    student = UNetModelSwin(**tiny_unet_kwargs())
    from safetensors.torch import load_file

    student.load_state_dict(load_file(tmp_path / "live" / "export" / "student.safetensors"))


def test_cached_teacher_trains_on_two_ray_workers_with_zero2(
    ray_cluster, tiny_shards, teacher_weights, tmp_path
):
    """The README path: cache the teacher once (Ray actors), then distil from the cache."""
    summary = load_job("cache_teacher").main(
        ["configs/cache_resshift_tiny.yaml", f"teacher.unet_checkpoint={teacher_weights}",
         f"shards=[{tiny_shards}]", f"output={tmp_path / 'cache'}", "num_actors=2"]
    )  # fmt: skip
    assert not summary["failed"]
    cfg = load_run_config(
        "tadsr_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=cached",
            f"method.teacher.unet_checkpoint={teacher_weights}",
            f"method.cache_dir={summary['cache_dir']}", "engine.zero_stage=2", "engine.max_steps=4",
            "engine.log_every=2", "engine.checkpoint.every_steps=4",
        ),
    )  # fmt: skip
    final = run(cfg)
    assert final["step"] == 4 and final["skipped_samples"] == 0
    saved = cfg.run_dir / "step_00000004"
    assert (saved / "disc").is_dir() and (saved / "student").is_dir()


def test_cache_of_another_teacher_is_refused_naming_the_difference(
    ray_cluster, tiny_shards, teacher_weights, tmp_path
):
    summary = load_job("cache_teacher").main(
        ["configs/cache_resshift_tiny.yaml", f"teacher.unet_checkpoint={teacher_weights}",
         f"shards=[{tiny_shards}]", f"output={tmp_path / 'cache'}", "num_actors=1",
         "teacher.sampler=stochastic"]
    )  # fmt: skip
    cfg = tadsr_cfg(
        tmp_path, tiny_shards, teacher_weights, f"method.cache_dir={summary['cache_dir']}"
    )
    with pytest.raises(ValueError, match="sampler"):
        run(cfg)


def test_previews_show_teacher_and_student_columns(tiny_shards, teacher_weights, tmp_path):
    from PIL import Image

    cfg = tadsr_cfg(
        tmp_path, tiny_shards, teacher_weights, "name=preview", "engine.max_steps=2",
        "engine.preview_every=2", "engine.checkpoint.every_steps=2",
    )  # fmt: skip
    run(cfg)
    grid = Image.open(cfg.run_dir / "previews" / "step_00000002.png")
    # 4 columns (bicubic | teacher | student | gt) x 4 samples of 32 px, 2 px padding
    assert grid.size == (4 * 34 + 2, 4 * 34 + 2)
    assert list((cfg.run_dir / "tensorboard").glob("events.*"))


def test_teacher_partitioned_with_zero3_across_two_ray_workers_in_fp32_and_bf16(
    ray_cluster, tiny_shards, teacher_weights, tmp_path
):
    """The frozen teacher split over the ranks (ZeRO-3, no optimizer) while the student and
    the discriminator train under ZeRO-2: the run completes with finite losses, in fp32 and in
    bf16 (every engine bf16, the gradients of HSD and the adversarial term through the
    partitioned teacher); bf16's first-step losses are fp32's within the bf16 bound."""
    first = {}
    for precision in ("fp32", "bf16"):
        cfg = load_run_config(
            "tadsr_tiny",
            tiny_overrides(
                tmp_path, tiny_shards, f"name=zero3teacher_{precision}",
                f"method.teacher.unet_checkpoint={teacher_weights}",
                "method.teacher_partition=zero3", "engine.zero_stage=2", "engine.max_steps=2",
                "engine.log_every=1", "engine.checkpoint.every_steps=2", "data.batch_size=2",
                f"engine.precision={precision}",
            ),
        )  # fmt: skip
        final = run(cfg)
        assert final["step"] == 2
        assert torch.isfinite(torch.tensor(final["loss/student"]))
        first[precision] = first_step(cfg.run_dir)
    for key in ("loss/disc", "loss/student", "distill", "adv_g"):
        ref, low = first["fp32"][key], first["bf16"][key]
        assert abs(low - ref) <= BF16_REL * abs(ref) + 1e-6, (key, low, ref)
