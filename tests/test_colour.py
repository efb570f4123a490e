"""Colour through the tiny pixel-space ResShift teacher (configs/resshift_tiny.yaml).

With ``model_channels = 32`` and the official 32 GroupNorm groups, the output head
``out = GroupNorm -> SiLU -> conv`` normalises every one of its 32 feature maps on its own: an
instance norm, which removes each map's spatial mean. The predicted image's colour can then only
pass through the maps' spatial *shape*, which a flat image has only near the zero-padded border:
trained on small crops the network learns to read colour off the border, and on a larger image
(where the border is a small part) the colour is lost. With 8 groups (4 channels per group) the
differences between a group's channel means survive the norm and carry the colour.
"""

from __future__ import annotations

import pytest
import torch

from distsr.config import CONFIG_DIR, load_yaml
from distsr.models.resshift import ResShift
from distsr.models.resshift_unet import UNetModelSwin
from distsr.recipes.resshift import ResShiftRecipe
from distsr.runconfig import load_run_config
from tests.ulps import assert_close_ulps

COLOURS = torch.tensor(
    [[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.02] * 3, [0.98] * 3, [0.5] * 3]
)
TRAIN_GT, EVAL_LQ = 16, 32  # train on 16^2 gt crops; check on 32^2 lq -> 128^2 sr
STEPS, BATCH = 200, 8
TOLERANCE = 0.12  # per-channel mean of sr vs the flat input colour (8-bit: ~31 levels)


def tiny_spec(norm_groups: int):
    spec = load_run_config("resshift_tiny").method
    spec.unet = {**spec.unet, "norm_groups": norm_groups}
    return spec


def flat(colours: torch.Tensor, size: int) -> torch.Tensor:
    return colours[:, :, None, None].expand(-1, -1, size, size).contiguous()


def test_tiny_configs_keep_several_channels_per_group():
    sections = {
        "resshift_tiny": ("method",),
        "tadsr_tiny": ("method", "teacher"),
        "cache_resshift_tiny": ("teacher",),
    }
    for name, keys in sections.items():
        section = load_yaml(CONFIG_DIR / f"{name}.yaml")
        for key in (*keys, "unet"):
            section = section[key]
        assert section["model_channels"] // section.get("norm_groups", 32) >= 4, name


@pytest.mark.parametrize("groups", [32, 8])
def test_output_head_norm_and_channel_offsets(groups):
    """A per-channel constant added to the head's input: invisible with one channel per group
    (the instance norm subtracts it again), a different image with four."""
    torch.manual_seed(0)
    head = UNetModelSwin(**tiny_spec(groups).unet).out
    h = torch.randn(2, 32, 16, 16)
    offset = torch.linspace(-2, 2, 32)[None, :, None, None]
    with torch.no_grad():
        base, shifted = head(h), head(h + offset)
    if groups == 32:  # equal up to rounding of the float32 mean/variance reductions
        assert_close_ulps(shifted, base, ulps=16, scale="tensor")  # measured: 2
    else:  # the sr's channel means move by far more than rounding
        assert (shifted - base).mean((2, 3)).abs().max() > 0.01


@pytest.fixture
def one_thread():
    """Small networks train fastest on one thread (and share a busy machine best)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_on_flat_colours(norm_groups: int) -> ResShift:
    """The tiny teacher's own training step (recipes.resshift), AdamW, random flat colours."""
    torch.manual_seed(0)
    recipe = ResShiftRecipe(tiny_spec(norm_groups), device=torch.device("cpu"))
    recipe.bind(recipe.trainable())  # plain modules: world size 1, no engine
    opt = torch.optim.AdamW(recipe.net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        colours = torch.rand(BATCH, 3, generator=gen)
        batch = {"gt": flat(colours, TRAIN_GT), "lq": flat(colours, TRAIN_GT // 4)}
        for update in recipe.training_step(batch, step):
            opt.zero_grad()
            update.loss.backward()
            opt.step()
    return recipe.model.eval()


@torch.no_grad()
def sr_means(model: ResShift, lq_size: int) -> torch.Tensor:
    """Per-channel means of the 4-step deterministic teacher's sr of flat lq images."""
    cond = model.prepare(flat(COLOURS, lq_size))
    eps = torch.randn(cond["z_y"].shape, generator=torch.Generator().manual_seed(5))
    fn = model.denoise_fn(model.unet, cond)
    z0 = model.diffusion.sample_deterministic(fn, cond["z_y"], eps)
    return model.decode(z0).mean((2, 3))


def test_flat_colours_come_back_with_8_groups_and_not_with_32(one_thread):
    """8 groups: every channel mean within TOLERANCE on images 8x the training crops' area.
    32 groups (the old tiny setting), same data, seed and steps: the colours sink towards one
    grey (measured: red (0.9, 0.1, 0.1) -> (0.62, 0.40, 0.42))."""
    kept = sr_means(train_on_flat_colours(8), EVAL_LQ)
    err = (kept - COLOURS).abs()
    assert err.max() < TOLERANCE, f"8 groups: sr means {kept.tolist()}, error {err.max():.3f}"
    lost = sr_means(train_on_flat_colours(32), EVAL_LQ)
    err = (lost - COLOURS).abs()
    assert err.max() > 2 * TOLERANCE, f"32 groups kept colour: {lost.tolist()}"
    spread = lost.max(0).values - lost.min(0).values  # per channel, over the six colours
    assert spread.max() < 0.5 < (COLOURS.max(0).values - COLOURS.min(0).values).min()
