"""Which lq the ResShift UNet is conditioned on: the upsampled lq in pixel space, lq itself in
the VQ-f4 latent space (at x2 the UNet's own feature extractor brings it to the latent size).
One rule (``models.resshift``) for training, the teacher, the student and inference."""

from __future__ import annotations

import torch

from distsr.models.autoencoder import AutoencoderConfig
from distsr.models.resshift import ResShift, ResShiftSpec, lq_condition, upsample_lq
from distsr.models.resshift_unet import UNetModelSwin


def test_pixel_space_uses_the_upsampled_lq():
    lq, y_up = upsample_lq(torch.rand(1, 3, 8, 8), 4)
    assert lq_condition(lq, y_up, (32, 32)).shape[-2:] == (32, 32)


def test_latent_space_uses_lq_itself_at_x4_and_x2():
    lq01 = torch.rand(1, 3, 16, 16)
    lq, y_up = upsample_lq(lq01, 4)
    assert torch.equal(lq_condition(lq, y_up, (16, 16)), lq01 * 2 - 1)  # VQ-f4 latent at x4
    lq, y_up = upsample_lq(lq01, 2)
    assert torch.equal(lq_condition(lq, y_up, (8, 8)), lq01 * 2 - 1)  # ... and at x2


def test_prepare_applies_the_rule_and_reuses_a_given_z_y():
    spec = ResShiftSpec(unet={}, autoencoder=AutoencoderConfig(kind="pixel"), scale=4)
    model = ResShift(spec, unet=torch.nn.Identity())
    lq = torch.rand(2, 3, 8, 8)
    cond = model.prepare(lq)
    assert torch.equal(cond["lq"], cond["z_y"]) and cond["z_y"].shape[-2:] == (32, 32)
    given = torch.zeros(2, 3, 32, 32)
    assert torch.equal(model.prepare(lq, z_y=given)["z_y"], given)


def test_x2_unet_maps_the_larger_lq_to_the_latent_size():
    torch.manual_seed(0)
    unet = UNetModelSwin(
        image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=[1],
        attention_resolutions=[], channel_mult=[1], num_head_channels=16, use_scale_shift_norm=True,
        swin_embed_dim=32, window_size=4, cond_lq=True, lq_size=16,
    )  # fmt: skip
    lq, y_up = upsample_lq(torch.rand(2, 3, 16, 16), 2)
    out = unet(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), lq=lq_condition(lq, y_up, (8, 8)))
    assert out.shape == (2, 3, 8, 8)
