"""The SeeSR teacher on tiny random parts written as files (SD-2 layout, SeeSR UNet/ControlNet at
the parity fixture's config, tiny RAM + tag files): the diffusion-teacher interface, the DDPM
step against diffusers, the pipeline's rules (prompt, up-scaling, start latent, colour fix), the
errors for missing files, and cached == live targets through the cache job's library."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distsr.config import ConfigError, from_dict, planning_without_files
from distsr.data.cache import TeacherCache
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.seesr import adain_color_fix, build_seesr_teacher, ddpm_step
from distsr.teachers.seesr_config import SeeSRTeacherConfig
from distsr.teachers.seesr_tiny import write_tiny_seesr
from tests.test_cache_targets import assert_live_equals_cached
from tests.test_teacher_cache import subset_shards
from tests.test_teacher_interface import check_diffusion_teacher
from tests.ulps import assert_close_ulps

FIXTURE = Path(__file__).parent / "fixtures" / "sr" / "seesr_tiny_config.json"
STEPS = 3  # DDPM steps of the tiny teacher (official: 50)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_seesr(tmp_path_factory) -> dict:
    """The teacher section reading tiny parts; the UNet is the parity fixture's config."""
    unet = json.loads(FIXTURE.read_text())["unet"]
    return write_tiny_seesr(tmp_path_factory.mktemp("seesr"), unet_config=unet)


def seesr_cfg(section: dict, **kw) -> SeeSRTeacherConfig:
    return from_dict(SeeSRTeacherConfig, {**section, "steps": STEPS, **kw})


@pytest.fixture(scope="module")
def teacher(tiny_seesr):
    return build_seesr_teacher(seesr_cfg(tiny_seesr))


def test_seesr_is_a_diffusion_teacher(teacher):
    cond = check_diffusion_teacher(teacher, (4, 4), [1, 3])  # 8x8 lq -> 32x32 -> 4x4 latent
    assert set(cond) == {"lq_up", "z_lq", "image_embeds", "prompt_embeds"}
    assert cond["lq_up"].shape == (2, 3, 32, 32)
    assert cond["image_embeds"].shape == (2, 17, 512)  # 1 mean token + 4x4 tiny-Swin tokens
    assert cond["prompt_embeds"].shape == (2, 16, 32)  # tiny tokenizer length x text width
    assert teacher.noise_tensors == 1 + STEPS
    assert teacher.timesteps == [667, 334, 1]  # "leading" spacing + steps_offset 1
    assert teacher.feature_channels([1, 3]) == [32, 64]


def test_prompt_upscaling_and_start_latent_follow_the_official_pipeline(teacher):
    assert teacher.prompts(["cat, dog", ""]) == [
        "cat, dog, ,clean, high-resolution, 8k", ", ,clean, high-resolution, 8k"]  # fmt: skip
    # short side 6 < process_size / scale = 8: enlarged to 8 first, then x4 to a multiple of 8
    assert teacher.upscale(torch.rand(1, 3, 6, 10)).shape[-2:] == (32, 48)
    cond = teacher.prepare(torch.rand(2, 3, 8, 8))
    eps = torch.randn(2, 4, 4, 4)
    abar = teacher.scheduler.alphas_cumprod[999]
    want = teacher.scheduler.add_noise(cond["z_lq"], eps, torch.tensor([999]))
    assert_close_ulps(teacher.prior(cond, eps), want, 4, scale="tensor")
    snr = teacher.sqrt_snr(torch.tensor([999, 20]), eps)
    assert snr.shape == (2, 1, 1, 1)
    assert abs(snr[0].item() - (abar / (1 - abar)).sqrt().item()) < 1e-7


def test_ddpm_step_is_diffusers_ddpm_scheduler_step(teacher):
    scheduler = copy.deepcopy(teacher.scheduler)
    scheduler.set_timesteps(STEPS)
    abar = teacher.abar.cpu()
    steps = teacher.timesteps
    for i, t in enumerate(steps):
        z, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
        want = scheduler.step(eps, t, z, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(i))
        prev_t = steps[i + 1] if i + 1 < len(steps) else -1
        got = ddpm_step(abar, eps, t, prev_t, z, noise)
        # diffusers computes the coefficients in float32, distsr in float64 then casts
        assert_close_ulps(got, want, 16, scale="tensor", msg=f"t={t}")


def test_guidance_uses_the_negative_prompt_and_changes_the_trajectory(tiny_seesr, teacher):
    plain = build_seesr_teacher(seesr_cfg(tiny_seesr, guidance_scale=1.0))
    lq = torch.rand(1, 3, 8, 8)
    cond = teacher.prepare(lq)
    noise = torch.randn(teacher.noise_tensors, 1, 4, 4, 4)
    assert not torch.allclose(teacher.sample(cond, noise), plain.sample(cond, noise))
    assert teacher.fingerprint() != plain.fingerprint()  # guidance is part of the identity
    # guidance 1: each step is the conditional eps (the DDPM step written out)
    z = plain.prior(cond, noise[0])
    for i, t in enumerate(plain.timesteps):
        prev_t = plain.timesteps[i + 1] if i + 1 < STEPS else -1
        z = ddpm_step(plain.abar, plain.denoiser(z, t, cond), t, prev_t, z, noise[1 + i])
    assert torch.equal(plain.sample(cond, noise), z)


def test_adain_colour_fix_takes_the_references_channel_statistics():
    image, ref = torch.rand(2, 3, 16, 16) * 0.5, torch.rand(2, 3, 16, 16) * 0.2 + 0.4
    out = adain_color_fix(image, ref)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(out.std((2, 3)), ref.std((2, 3)), atol=1e-4)


def test_missing_files_are_named_with_what_they_should_hold(tiny_seesr, tmp_path):
    partial = tmp_path / "sd2"
    (partial / "vae").mkdir(parents=True)
    section = {"sd2_dir": str(partial), "seesr_dir": str(tmp_path / "nowhere"),
               "ram": {"checkpoint": str(tmp_path / "ram.pth")}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        from_dict(SeeSRTeacherConfig, section)
    message = str(err.value)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert f"not found in {partial / part}\n" in message
    assert "AutoencoderKL" in message and "CLIPTokenizer" in message
    assert str(tmp_path / "nowhere" / "unet") in message
    assert str(tmp_path / "nowhere" / "controlnet") in message
    assert "ram.checkpoint: RAM checkpoint" in message and "ram.tag_list: not set" in message
    with planning_without_files() as missing:  # --dry-run: listed, not refused
        from_dict(SeeSRTeacherConfig, section)
    assert len(missing) == 9
    assert from_dict(SeeSRTeacherConfig, tiny_seesr).sd2_dir == tiny_seesr["sd2_dir"]


def test_student_trains_only_the_named_modules_when_configured(tiny_seesr):
    names = ["image_attentions", "controlnet_cond_embedding"]  # official TAD-SeeSR
    student = build_seesr_teacher(seesr_cfg(tiny_seesr, student_trainable=names)).make_student()
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(any(k in n.split(".") for k in names) for n in trained)
    assert any(n.startswith("unet.") for n in trained)
    assert any(n.startswith("controlnet.controlnet_cond_embedding.") for n in trained)


def test_cached_targets_equal_the_live_teacher(teacher, tiny_seesr, tiny_shards, tmp_path):
    shards = subset_shards(tiny_shards, tmp_path / "in", 1, 8)
    job = CacheJobConfig(teacher=seesr_cfg(tiny_seesr), shards=[str(shards)],
                         output=str(tmp_path / "cache"), batch_size=4)  # fmt: skip
    summary = run_in_process(job, teacher)
    assert summary["failed"] == {} and summary["samples"] == 8
    cache = TeacherCache(summary["cache_dir"])
    assert set(cache.stored) == {"z_lq", "image_embeds", "prompt_embeds"}
    assert summary["fingerprint"] == teacher.fingerprint()
    assert_live_equals_cached(teacher, cache, shards, steps=2)
