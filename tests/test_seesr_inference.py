"""A SeeSR-distilled student in ``python -m distsr.upscale`` and ``python -m distsr.evaluate`` (one
step from the noised LR latent, the condition computed by the frozen parts, latent tiling with
Gaussian blending) and its export as the SeeSR release's diffusers folders, on tiny random parts
written as files and a run folder as training leaves it (config.yaml + export/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from distsr.config import from_dict
from distsr.evaluate.cli import main as evaluate_main
from distsr.inference.predictors import load_predictor
from distsr.inference.seesr import SeeSRMultiStep, SeeSROneStep, TiledDenoiser, gaussian_weights
from distsr.inference.tiling import upscale_tiled
from distsr.models.seesr import SeeSRControlNet, SeeSRUNet
from distsr.runconfig import load_run_config, to_dict
from distsr.teachers.seesr import adain_color_fix, build_seesr_teacher
from distsr.teachers.seesr_config import SeeSRTeacherConfig
from distsr.teachers.seesr_tiny import write_tiny_seesr
from distsr.upscale.cli import main as upscale_main
from tests.test_evaluate import lq_tensor, photo_crop
from tests.test_seesr_launch import path_overrides
from tests.ulps import assert_close_ulps

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory) -> dict:
    return write_tiny_seesr(tmp_path_factory.mktemp("tiny_seesr"))


@pytest.fixture(scope="module")
def teacher(tiny_parts):
    cfg = from_dict(SeeSRTeacherConfig, {**tiny_parts, "steps": 2})
    return build_seesr_teacher(cfg)


@pytest.fixture(scope="module")
def run(tiny_parts, teacher, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tadsr_seesr_tiny run folder whose exported student differs from the teacher."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_run_config("tadsr_seesr_tiny", path_overrides(tiny_parts, "method.teacher"))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    student = teacher.make_student().eval().requires_grad_(False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    (run / "export").mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(run / "export" / "student_ema.safetensors"))
    return run, student


def test_the_seesr_run_gives_the_one_step_student(run, teacher):
    run_dir, student = run
    predictor = load_predictor(run_dir, device="cpu", seed=3)
    assert isinstance(predictor, SeeSROneStep) and predictor.steps == 1 and predictor.scale == 4
    lq = lq_tensor("chelsea", 8)
    # by hand: the frozen parts' condition, z_T at t = 999, the student's step, decode, colour fix
    cond = teacher.prepare(lq)
    eps = torch.randn((1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(3))[0]
    z0 = teacher.student_step(student, teacher.prior(cond, eps), cond)
    want = adain_color_fix(teacher.decode(z0), cond["lq_up"])
    sr = predictor(lq)
    assert sr.shape == (1, 3, 32, 32) and torch.equal(sr, want)


def test_the_teacher_column_is_the_frozen_teachers_sampler(run, teacher):
    predictor = load_predictor(run[0], steps="all", device="cpu", seed=3)
    assert isinstance(predictor, SeeSRMultiStep) and predictor.steps == 2
    lq = lq_tensor("coffee", 8)
    cond = teacher.prepare(lq)
    noise = torch.randn((teacher.noise_tensors, 1, 4, 4, 4),
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    want = adain_color_fix(teacher.decode(teacher.sample(cond, noise)), cond["lq_up"])
    assert torch.equal(predictor(lq), want)


def test_gaussian_weights_peak_at_the_tile_centre():
    g = gaussian_weights(5, 4)
    assert g.shape == (5, 4) and g.dtype == torch.float64
    assert g[2].argmax() in (1, 2) and g[:, 1].argmax() == 2
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.flip(1))
    # exp(-(x - mid)^2 / n^2 / (2 var)), var 0.01: two rows off the centre of 5 -> exp(-8)
    assert float(g[0, 1] / g[2, 1]) == pytest.approx(np.exp(-8.0), rel=1e-12)


def local_eps(z_t, t, cond):
    """A per-latent-pixel eps network that reads its pixels of the ControlNet condition."""
    lq_up = cond["lq_up"][..., ::8, ::8].mean(1, keepdim=True)
    return z_t * 0.5 + lq_up + cond["prompt_embeds"].mean() + float(t) * 1e-3


def test_latent_tiles_blend_back_to_the_untiled_eps():
    z = torch.randn(2, 4, 13, 10)
    cond = {"lq_up": torch.rand(2, 3, 13 * 8, 10 * 8), "prompt_embeds": torch.randn(2, 3, 5)}
    whole = local_eps(z, 999, cond)
    tiled = TiledDenoiser(local_eps, tile=4, overlap=1)
    assert len(tiled.tiles(13, 10)) == 4 * 3  # rows start 0, 3, 6, 9 (moved back); cols 0, 3, 6
    assert_close_ulps(tiled(z, 999, cond), whole, 2, scale="tensor")
    # one tile covering the latent is the network itself
    assert torch.equal(TiledDenoiser(local_eps, tile=16, overlap=4)(z, 999, cond), whole)
    with pytest.raises(ValueError, match="overlap < tile"):
        TiledDenoiser(local_eps, tile=4, overlap=4)


def test_large_inputs_are_tiled_in_latent_space(run):
    predictor = load_predictor(run[0], device="cpu", seed=3)
    lq = lq_tensor("astronaut", 24)  # latent 12x12
    untiled = predictor(lq)
    tiled = upscale_tiled(predictor, lq, 4, tile=8, overlap=2)  # latent tiles 4, overlap 1
    assert tiled.shape == untiled.shape == (1, 3, 96, 96)
    assert torch.isfinite(tiled).all() and not torch.equal(tiled, untiled)
    # a tile covering the image is the untiled student
    assert torch.equal(upscale_tiled(predictor, lq, 4, tile=24, overlap=2), untiled)


def test_upscale_and_evaluate_take_a_seesr_student(run, tmp_path):
    run_dir = run[0]
    images = tmp_path / "lq"
    images.mkdir()
    Image.fromarray(photo_crop("rocket", 12)).save(images / "rocket.png")  # 12 px: resized to 48
    out = tmp_path / "sr"
    argv = ["--checkpoint", str(run_dir), str(images), str(out), "--tile", "8", "--overlap", "2"]
    assert upscale_main([*argv, "--device", "cpu"]) == 0
    assert np.asarray(Image.open(out / "rocket.png")).shape == (48, 48, 3)
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photo_crop(name, 32)).save(gt / f"{name}.png")
    report = tmp_path / "eval"
    argv = ["--gt", str(gt), "--student", str(run_dir), "--teacher", str(run_dir), "--out",
            str(report), "--metrics", "psnr", "--device", "cpu"]  # fmt: skip
    assert evaluate_main(argv) == 0
    result = json.loads((report / "metrics.json").read_text())["predictors"]
    assert result["student"]["steps"] == 1 and result["teacher"]["steps"] == 2
    assert np.isfinite(result["student"]["mean"]["psnr"])


def test_export_writes_the_release_folders_that_load_strictly(run, tiny_parts, tmp_path):
    run_dir, student = run
    out = tmp_path / "seesr_student"
    assert upscale_main(["export", "--checkpoint", str(run_dir), str(out)]) == 0
    exported = load_file(str(run_dir / "export" / "student_ema.safetensors"))
    for name, cls, stock in (("unet", SeeSRUNet, "UNet2DConditionModel"),
                             ("controlnet", SeeSRControlNet, "ControlNetModel")):  # fmt: skip
        config = json.loads((out / name / "config.json").read_text())
        assert config["_class_name"] == stock  # what the official loaders read
        net = cls.from_folder(out / name)  # strict: every key, every shape
        state = net.state_dict()
        want = {k[len(name) + 1 :]: v for k, v in exported.items() if k.startswith(name + ".")}
        assert set(state) == set(want)
        assert all(torch.equal(state[k], want[k]) for k in want), name
    # the folder stands in for the release: a teacher built on it runs the student's weights
    rebuilt = build_seesr_teacher(from_dict(SeeSRTeacherConfig,
                                            {**tiny_parts, "seesr_dir": str(out)}))  # fmt: skip
    assert all(torch.equal(v, student.state_dict()[k])
               for k, v in rebuilt.denoiser.state_dict().items())  # fmt: skip
    sidecar = yaml.safe_load((out / "export.yaml").read_text())
    assert sidecar["seesr_model_path"] == str(out)
    assert sidecar["pretrained_model_path"] == tiny_parts["sd2_dir"]
    assert upscale_main(["export", "--checkpoint", str(run_dir), str(out)]) == 2  # no overwrite
    assert upscale_main(["export", "--checkpoint", str(run_dir), str(tmp_path / "s.pth")]) == 2
