"""The ``Teacher`` interface, one test per kind of teacher: latent diffusion (ResShift + VQ-f4),
pixel diffusion (tiny ResShift), a one-forward regression net, and a multi-teacher wrapper."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distsr.diffusion.schedule import ScheduleConfig
from distsr.models.autoencoder import AutoencoderConfig, VQAutoencoder
from distsr.models.resshift import ResShift
from distsr.models.resshift_unet import UNetModelSwin
from distsr.models.vq import build_vq_f4
from distsr.teachers import MultiTeacher, RegressionTeacher, ResShiftTeacher, TeacherConfig
from distsr.teachers.noise import noise_for

SCHEDULE = ScheduleConfig(steps=4, kappa=2.0, min_noise_level=0.2, etas_end=0.99, power=0.3)


def tiny_unet_kwargs(size: int) -> dict:
    return dict(
        image_size=size, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
        num_res_blocks=[1, 1], attention_resolutions=[size // 2], dropout=0.0,
        conv_resample=True, dims=2, use_fp16=False, num_head_channels=16,
        use_scale_shift_norm=True, resblock_updown=False, swin_depth=2, swin_embed_dim=32,
        window_size=4, mlp_ratio=4, cond_lq=True, lq_size=size,
    )  # fmt: skip


def resshift_teacher(latent: bool, seed: int = 0, sampler: str = "deterministic"):
    """A tiny random ResShift teacher: VQ-f4-shaped latents (8x8 for 32x32 gt) or pixels."""
    torch.manual_seed(seed)
    size = 8 if latent else 32
    kind = "vq_f4" if latent else "pixel"
    cfg = TeacherConfig(unet=tiny_unet_kwargs(size), autoencoder=AutoencoderConfig(kind=kind),
                        schedule=SCHEDULE, sampler=sampler, scale=4)  # fmt: skip
    autoencoder = None
    if latent:  # a VQ-f4 (three levels: factor 4) small enough for a CPU test
        vq = build_vq_f4(block_out_channels=[32, 32, 32], layers_per_block=1,
                         num_vq_embeddings=64, norm_num_groups=8)  # fmt: skip
        autoencoder = VQAutoencoder(vq=vq)
    model = ResShift(cfg, unet=UNetModelSwin(**cfg.unet), autoencoder=autoencoder)
    return ResShiftTeacher(cfg, model)


def check_diffusion_teacher(teacher, latent_hw: tuple[int, int], levels: list):
    """What every diffusion recipe relies on, for any diffusion teacher."""
    lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    cond = teacher.prepare(lq)
    shape = teacher.noise_shape(cond)
    assert shape[-2:] == latent_hw
    noise = noise_for(["a", "b"], shape, seed=0, tensors=teacher.noise_tensors)
    z_T = teacher.prior(cond, noise)
    z0 = teacher.sample(cond, noise)
    assert z0.shape == z_T.shape == (2, *shape) and torch.isfinite(z0).all()
    assert teacher.encode_gt(gt).shape == z0.shape
    image = teacher.decode(z0)
    assert image.shape == (2, 3, 32, 32) and image.min() >= 0 and image.max() <= 1
    # the cache stores only `stored`; prepare rebuilds the same condition from them
    rebuilt = teacher.prepare(lq, stored={k: cond[k].half().float() for k in teacher.stored})
    assert rebuilt.keys() == cond.keys()
    # a fresh student is the teacher's denoiser: its one step equals the teacher's x0 at T-1
    student = teacher.make_student()
    assert all(p.requires_grad for p in student.parameters())
    x0 = teacher.denoise(z_T, teacher.num_timesteps - 1, cond)
    assert torch.allclose(teacher.student_step(student, z_T, cond), x0, atol=1e-6)
    # features of the noised student output are differentiable w.r.t. it
    z_t = z_T.clone().requires_grad_()
    feats = teacher.features(z_t, 1, cond, levels)
    assert [f.shape[1] for f in feats] == teacher.feature_channels(levels)
    sum(f.square().mean() for f in feats).backward()
    assert z_t.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in teacher.parameters())  # still frozen
    return cond


def test_latent_diffusion_teacher_resshift_vq_f4():
    teacher = resshift_teacher(latent=True)
    cond = check_diffusion_teacher(teacher, (8, 8), [1, 3, "mid"])
    assert cond["lq"].shape[-2:] == (8, 8)  # latent space at x4: the condition is lq itself


def test_pixel_diffusion_teacher_resshift_tiny():
    teacher = resshift_teacher(latent=False)
    cond = check_diffusion_teacher(teacher, (32, 32), [1, "mid"])
    assert torch.equal(cond["lq"], cond["z_y"])  # pixel space: the condition is the upsampled lq


def test_resshift_sqrt_snr_is_the_hsd_weight():
    teacher = resshift_teacher(latent=False)
    like = torch.zeros(2, 3, 4, 4)
    eta = torch.tensor(teacher.diffusion.etas[[0, 2]], dtype=torch.float32)
    expected = (1 - eta) / (eta.sqrt() * SCHEDULE.kappa)
    got = teacher.sqrt_snr(torch.tensor([0, 2]), like)
    assert got.shape == (2, 1, 1, 1) and torch.allclose(got.flatten(), expected, rtol=1e-6)


class TinySR(nn.Module):
    """conv -> pixel shuffle x4 -> sigmoid: a one-forward SR net in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3 * 16, 3, padding=1)

    def forward(self, lq):
        return torch.sigmoid(nn.functional.pixel_shuffle(self.conv(lq), 4))


def test_regression_teacher_is_one_forward_without_noise_or_features():
    torch.manual_seed(0)
    net = TinySR()
    teacher = RegressionTeacher(copy.deepcopy(net), scale=4)
    lq = torch.rand(2, 3, 8, 8)
    cond = teacher.prepare(lq)
    assert teacher.noise_shape(cond) is None and teacher.noise_tensors == 0
    assert torch.equal(teacher.sample(cond, None), net(lq))
    gt = torch.rand(2, 3, 32, 32)
    assert torch.equal(teacher.encode_gt(gt), gt) and torch.equal(teacher.decode(gt), gt)
    assert not teacher.supports("prior") and not teacher.supports("features")
    with pytest.raises(NotImplementedError, match="RegressionTeacher.*prior"):
        teacher.prior(cond, None)
    assert teacher.fingerprint().startswith("regression-")
    bad = RegressionTeacher(nn.Conv2d(3, 3, 1), scale=4)  # x1 net configured as x4
    with pytest.raises(ValueError, match="expected"):
        bad.sample(bad.prepare(lq))


def test_multi_teacher_returns_one_output_per_teacher():
    torch.manual_seed(0)
    a, b = RegressionTeacher(TinySR(), 4), RegressionTeacher(TinySR(), 4)
    multi = MultiTeacher({"a": a, "b": b})
    assert multi.outputs == ("z0.a", "z0.b") and multi.noise_tensors == 0
    lq = torch.rand(2, 3, 8, 8)
    cond = multi.prepare(lq)
    assert multi.noise_shape(cond) is None
    out = multi.sample(cond, None)
    assert torch.equal(out["z0.a"], a.sample(a.prepare(lq)))
    assert torch.equal(out["z0.b"], b.sample(b.prepare(lq)))
    assert not torch.equal(out["z0.a"], out["z0.b"])
    before = multi.fingerprint()
    with torch.no_grad():
        b.net.conv.bias.add_(1e-3)
    b._weights_hash = None  # the weights changed: hash again
    assert multi.fingerprint() != before


def test_multi_teacher_of_diffusion_teachers_prefixes_stored_condition():
    multi = MultiTeacher({"x": resshift_teacher(False, 0), "y": resshift_teacher(False, 1)})
    assert multi.stored == ("x.z_y", "y.z_y") and multi.noise_tensors == 1
    lq = torch.rand(1, 3, 8, 8)
    cond = multi.prepare(lq)
    noise = noise_for(["k"], multi.noise_shape(cond), seed=0)
    out = multi.sample(cond, noise)
    assert out["z0.x"].shape == out["z0.y"].shape == (1, 3, 32, 32)
    stored = {k: cond[k] for k in multi.stored}
    assert torch.equal(multi.sample(multi.prepare(lq, stored), noise)["z0.y"], out["z0.y"])
