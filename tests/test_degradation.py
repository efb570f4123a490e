"""lq synthesis: bicubic and Real-ESRGAN second-order degradation, kernels, config checks."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from distsr.config import ConfigError, from_dict
from distsr.data.config import DegradationConfig
from distsr.data.degradation import bicubic_downscale, degrade
from distsr.data.kernels import (
    KERNEL_TYPES,
    gaussian_kernel,
    generalized_gaussian_kernel,
    make_kernel,
    plateau_kernel,
    sample_beta,
    sample_blur_params,
    sample_sinc_params,
    sinc_kernel,
)

# Everything off except what a test turns on: no blur, keep size, zero noise, JPEG quality 100.
QUIET = {
    "blur_prob": 0.0,
    "resize_prob": [0, 0, 1],
    "gaussian_noise_prob": 1.0,
    "noise_range": [0, 0],
    "jpeg_range": [100, 100],
}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[64:192, 160:288])  # 128x128 face crop


def realesrgan(stage1=None, stage2=None, **top) -> DegradationConfig:
    cfg = {"kind": "realesrgan", "stage1": stage1 or {}, "stage2": stage2 or {}, **top}
    return from_dict(DegradationConfig, cfg)


def quiet(stage1=None, stage2=None, final_sinc_prob=0.0) -> DegradationConfig:
    """A Real-ESRGAN config with every step off (see QUIET) but those given."""
    stage1, stage2 = {**QUIET, **(stage1 or {})}, {**QUIET, **(stage2 or {})}
    return realesrgan(stage1, stage2, final_sinc_prob=final_sinc_prob)


# ------------------------------------------------------------------ determinism and meta


def test_same_seed_gives_identical_lq_and_meta(photo):
    cfg = realesrgan()
    for seed in range(4):
        lq_a, meta_a = degrade(photo, cfg, seed)
        lq_b, meta_b = degrade(photo.copy(), cfg, seed)
        assert np.array_equal(lq_a, lq_b)
        assert meta_a == meta_b


def test_different_seeds_give_different_lq(photo):
    cfg = realesrgan()
    outs = [degrade(photo, cfg, seed) for seed in range(4)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.array_equal(outs[i][0], outs[j][0])
            assert outs[i][1] != outs[j][1]


def test_same_seed_is_bit_exact_in_a_fresh_process(photo):
    cfg = realesrgan()
    here = hashlib.sha256(degrade(photo, cfg, 11)[0].tobytes()).hexdigest()
    script = (
        "import hashlib, numpy as np; from skimage import data;"
        "from distsr.config import from_dict; from distsr.data.config import DegradationConfig;"
        "from distsr.data.degradation import degrade;"
        "gt = np.ascontiguousarray(data.astronaut()[64:192, 160:288]);"
        "cfg = from_dict(DegradationConfig, {'kind': 'realesrgan'});"
        "print(hashlib.sha256(degrade(gt, cfg, 11)[0].tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_meta_holds_every_sampled_value_and_round_trips_json(photo):
    lq, meta = degrade(photo, realesrgan(final_sinc_prob=1.0), seed=5)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["seed"] == 5 and meta["kind"] == "realesrgan" and meta["gt_size"] == [128, 128]
    for stage in ("stage1", "stage2"):
        assert {"blur", "resize", "noise"} <= set(meta[stage])
        assert set(meta[stage]["resize"]) == {"direction", "factor", "mode", "size"}
        assert meta[stage]["noise"]["type"] in ("gaussian", "poisson")
        assert isinstance(meta[stage]["noise"]["gray"], bool)
    assert 30 <= meta["stage1"]["jpeg_quality"] <= 95
    assert set(meta["final"]) == {"order", "resize_mode", "sinc", "jpeg_quality"}
    # The blur kernel is stage 1's first step, so its recorded parameters must rebuild it.
    kernel = make_kernel(meta["stage1"]["blur"])
    assert kernel.shape == (meta["stage1"]["blur"]["size"],) * 2
    assert make_kernel(meta["final"]["sinc"]).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["bicubic", "realesrgan"])
@pytest.mark.parametrize("scale", [2, 4])
def test_lq_shape_is_gt_over_scale(kind, scale, photo):
    gt = np.ascontiguousarray(photo[:96, :64])  # non-square on purpose
    cfg = from_dict(DegradationConfig, {"kind": kind, "scale": scale})
    for seed in range(3):
        lq, meta = degrade(gt, cfg, seed)
        assert lq.shape == (96 // scale, 64 // scale, 3) and lq.dtype == np.uint8
        assert meta["scale"] == scale


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES)
@pytest.mark.parametrize("size", [7, 13, 21])
def test_every_kernel_type_sums_to_one_with_the_requested_size(kind, size):
    rng = np.random.default_rng(0)
    params = sample_blur_params(rng, size, [kind], [1.0], (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
    kernel = make_kernel(params)
    assert params["type"] == kind
    assert kernel.shape == (size, size)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    assert (kernel >= 0).all()
    assert np.allclose(kernel, kernel[::-1, ::-1])  # point-symmetric quadratic form
    assert kernel.argmax() == size * size // 2  # peak at the centre
    if kind.endswith("iso") and not kind.endswith("aniso"):
        assert params["sigma_y"] == params["sigma_x"] and np.allclose(kernel, kernel.T)


@pytest.mark.parametrize("size", [7, 13, 21])
def test_sinc_kernel_sums_to_one_and_rings(size):
    kernel = make_kernel(sample_sinc_params(np.random.default_rng(1), size, (math.pi / 3, 1.2)))
    assert kernel.shape == (size, size)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    assert kernel.argmax() == size * size // 2
    assert kernel.min() < 0  # negative side lobes: the ringing the sinc filter is there for
    assert np.allclose(kernel, kernel.T)


def test_kernel_shapes_match_their_formulas():
    sigma = 1.3
    g1 = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    assert np.allclose(gaussian_kernel(7, sigma), np.outer(g1, g1) / np.outer(g1, g1).sum())
    assert np.allclose(generalized_gaussian_kernel(7, sigma, beta=1.0), gaussian_kernel(7, sigma))
    plateau = plateau_kernel(7, sigma, beta=2.0)
    assert plateau[3, 4] / plateau[3, 3] == pytest.approx(1 / (1 + sigma**-4))
    # Anisotropic: rotating by 90 degrees swaps the axes.
    k = gaussian_kernel(9, 2.5, 0.7, 0.0)
    assert k[4, 6] > k[6, 4]  # wide along x (columns)
    assert np.allclose(gaussian_kernel(9, 2.5, 0.7, math.pi / 2), k.T)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 1.0)
    with pytest.raises(ValueError, match="omega_c"):
        sinc_kernel(7, 4.0)


def test_beta_straddles_one_like_real_esrgan_or_stays_in_range():
    rng = np.random.default_rng(0)
    betas = np.array([sample_beta(rng, (0.5, 4.0)) for _ in range(400)])
    assert 0.4 < (betas < 1).mean() < 0.6 and betas.min() >= 0.5 and betas.max() <= 4.0
    assert sample_beta(rng, (2.0, 2.0)) == 2.0


# ------------------------------------------------------------------ probabilities 0 / 1


def test_gaussian_noise_prob_one_adds_the_requested_sigma():
    flat = np.full((64, 64, 3), 128, np.uint8)
    gray = {"noise_range": [10, 10], "gray_noise_prob": 1.0}
    lq, meta = degrade(flat, quiet(stage2=gray), seed=0)
    assert meta["stage2"]["noise"] == {"type": "gaussian", "sigma": 10.0, "gray": True}
    assert 8.5 < lq.astype(float).std() < 12.5
    assert np.array_equal(lq[..., 0], lq[..., 1])  # grey noise: the same on every channel
    colour_cfg = quiet(stage2={"noise_range": [10, 10], "gray_noise_prob": 0.0})
    colour, _ = degrade(flat, colour_cfg, seed=0)
    assert np.abs(colour[..., 0].astype(int) - colour[..., 1]).max() > 5
    silent, _ = degrade(flat, quiet(), seed=0)
    assert (silent == 128).all()


def test_jpeg_quality_30_and_100_differ(photo):
    lq_100, m_100 = degrade(photo, quiet(), seed=1)
    lq_30, m_30 = degrade(photo, quiet({"jpeg_range": [30, 30]}, {"jpeg_range": [30, 30]}), 1)
    assert m_100["final"]["jpeg_quality"] == 100 and m_30["stage1"]["jpeg_quality"] == 30
    assert np.abs(lq_100.astype(int) - lq_30).mean() > 1.0


def test_probabilities_zero_and_one_skip_or_force_steps(photo):
    s1, s2 = {"blur_prob": 1.0, "resize_prob": [1, 0, 0]}, {"resize_prob": [0, 1, 0]}
    always = quiet(s1, s2, final_sinc_prob=1.0)
    never = quiet({"gaussian_noise_prob": 0.0, "poisson_scale_range": [0.5, 0.5]})
    for seed in range(5):
        _, meta = degrade(photo, always, seed)
        assert meta["stage1"]["blur"] is not None and meta["stage2"]["blur"] is None
        assert meta["stage1"]["resize"]["direction"] == "up"
        assert meta["stage1"]["resize"]["factor"] >= 1.0
        assert meta["stage2"]["resize"]["direction"] == "down"
        assert meta["final"]["sinc"]["type"] == "sinc"
        _, meta = degrade(photo, never, seed)
        assert meta["stage1"]["noise"]["type"] == "poisson" and meta["final"]["sinc"] is None


def test_both_final_orders_occur():
    flat = np.full((16, 16, 3), 90, np.uint8)
    orders = {degrade(flat, quiet(), seed)[1]["final"]["order"] for seed in range(20)}
    assert orders == {"resize_sinc_jpeg", "jpeg_resize_sinc"}


# ------------------------------------------------------------------ config and input checks


def test_defaults_are_real_esrgan_x4plus():
    cfg = DegradationConfig()
    assert cfg.stage1.kernel_prob == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    assert cfg.stage1.resize_range == [0.15, 1.5] and cfg.stage2.resize_range == [0.3, 1.2]
    assert cfg.stage2.blur_prob == 0.8 and cfg.final_sinc_prob == 0.8
    assert cfg.all_problems() == []
    # A partial stage2 override keeps the stage-2 defaults, not stage 1's.
    cfg = realesrgan(stage2={"noise_range": [1, 5]})
    assert cfg.stage2.blur_sigma == [0.2, 1.5] and cfg.stage2.noise_range == [1.0, 5.0]


def test_bad_values_are_reported_by_key_path():
    bad = {
        "scale": 0,
        "final_sinc_prob": 1.5,
        "stage1": {"sinc_prob": -0.1, "noise_range": [30, 1], "kernel_list": ["iso", "box"]},
        "stage2": {"blur_kernel_size": 20, "resize_prob": [0.5, 0.5], "jpeg_range": [30, 101]},
    }
    with pytest.raises(ConfigError) as info:
        from_dict(DegradationConfig, bad)
    paths = {path for path, _ in info.value.problems}
    assert {
        "scale",
        "final_sinc_prob",
        "stage1.sinc_prob",
        "stage1.noise_range",
        "stage1.kernel_list[1]",
        "stage2.blur_kernel_size",
        "stage2.resize_prob",
        "stage2.jpeg_range",
    } <= paths
    with pytest.raises(ConfigError, match="stage1.kernel_prob"):
        from_dict(DegradationConfig, {"stage1": {"kernel_list": ["iso"]}})  # 6 probs for 1 type


def test_degrade_rejects_bad_inputs_with_helpful_errors(photo):
    cfg = realesrgan()
    with pytest.raises(ValueError, match="divisible by scale=4"):
        degrade(np.ascontiguousarray(photo[:30]), cfg, 0)
    with pytest.raises(ValueError, match="uint8"):
        degrade(photo.astype(np.float32), cfg, 0)
    cfg.stage2.sinc_prob = 2.0  # built in code, never validated by from_dict
    with pytest.raises(ValueError, match="stage2.sinc_prob"):
        degrade(photo, cfg, 0)


# ------------------------------------------------------------------ real photo


def test_bicubic_lq_matches_pil_antialiased_bicubic(photo):
    for scale in (2, 4):
        size = (128 // scale, 128 // scale)
        lq = degrade(photo, DegradationConfig(kind="bicubic", scale=scale), 0)[0].astype(int)
        pil = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC)).astype(int)
        naive = cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC).astype(int)
        assert np.abs(lq - pil).max() <= 3 and np.abs(lq - pil).mean() < 0.3
        assert np.abs(lq - naive).mean() > 2 * np.abs(lq - pil).mean()  # antialiasing matters
    assert np.array_equal(bicubic_downscale(photo, 4), degrade(photo, DegradationConfig(), 9)[0])


def test_realesrgan_lq_is_a_degraded_version_of_the_photo(photo):
    clean = bicubic_downscale(photo, 4).astype(float)
    for seed in range(4):
        lq = degrade(photo, realesrgan(), seed)[0].astype(float)
        corr = np.corrcoef(lq.ravel(), clean.ravel())[0, 1]
        assert corr > 0.6  # still the same picture ...
        assert np.abs(lq - clean).mean() > 1.0  # ... but visibly degraded
