"""Which lq the ResShift UNet is conditioned on: the upsampled lq in pixel space, lq itself in
the VQ-f4 latent space (at x2 the UNet's own feature extractor brings it to the latent size)."""

from __future__ import annotations

import torch

from distsr.models.resshift_unet import UNetModelSwin
from distsr.teachers.resshift import lq_condition


def test_pixel_space_uses_the_upsampled_lq():
    lq = torch.rand(1, 3, 8, 8)
    assert lq_condition(lq, 4, (32, 32)).shape[-2:] == (32, 32)


def test_latent_space_uses_lq_itself_at_x4_and_x2():
    lq = torch.rand(1, 3, 16, 16)
    x4 = lq_condition(lq, 4, (16, 16))  # VQ-f4 latent of the x4 image has lq's size
    assert torch.allclose(x4, lq * 2 - 1)
    x2 = lq_condition(lq, 2, (8, 8))  # VQ-f4 latent of the x2 image is half of lq
    assert torch.allclose(x2, lq * 2 - 1)


def test_x2_unet_maps_the_larger_lq_to_the_latent_size():
    torch.manual_seed(0)
    unet = UNetModelSwin(
        image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=[1],
        attention_resolutions=[], channel_mult=[1], num_head_channels=16, use_scale_shift_norm=True,
        swin_embed_dim=32, window_size=4, cond_lq=True, lq_size=16,
    )  # fmt: skip
    lq = torch.rand(2, 3, 16, 16)
    cond = lq_condition(lq, 2, (8, 8))
    out = unet(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), lq=cond)
    assert out.shape == (2, 3, 8, 8)
