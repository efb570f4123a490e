"""Make ``lq`` from ``gt``: bicubic downscale, or Real-ESRGAN's second-order degradation.

``degrade(gt, cfg, seed)`` draws every random choice from ``np.random.default_rng(seed)`` (no
global RNG) in a fixed order, so the same ``gt``, ``cfg`` and ``seed`` give the same ``lq``
bit for bit on one machine, and ``meta`` records every sampled value (kernels can be rebuilt
with ``distsr.data.kernels.make_kernel(meta[...]["blur"])``).

Real-ESRGAN (Wang et al., ICCV-W 2021, Sec. 3.2 "high-order degradation", Fig. 2) applies
  stage 1: blur -> random resize -> Gaussian/Poisson noise -> JPEG
  stage 2: blur (with ``second_blur_prob``) -> random resize -> noise
  final:   [resize to gt/scale + sinc filter] and JPEG, in one of the two orders at random
  then clamps and rounds to 8 bits. Images are float32 RGB in [0, 1] in between.

Differences from the official training code, on purpose:
* JPEG goes through OpenCV (``cv2.imencode``, integer quality drawn from ``jpeg_range``, 4:2:0
  chroma), not BasicSR's DiffJPEG; the artifacts are of the same kind, not the same numbers.
* ``gt`` is degraded as given: the official model degrades the USM-sharpened ``gt``.
* Borders: blur uses reflect padding like ``filter2D`` but also works when the kernel is
  larger than the image (numpy's repeated reflection).

``kind="bicubic"``: ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` on float,
then rounding. With antialias torch uses the Keys kernel with a=-0.5 widened by the scale, as
PIL's BICUBIC and MATLAB's ``imresize`` do (they differ only at the borders / in rounding).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distsr.data.config import DegradationConfig, Stage1Config
from distsr.data.kernels import (
    make_kernel,
    sample_blur_params,
    sample_sinc_params,
    sample_size,
)

RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS = ("up", "down", "keep")
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma (torchvision)


def degrade(gt: np.ndarray, cfg: DegradationConfig, seed: int) -> tuple[np.ndarray, dict]:
    """``gt`` HxWx3 uint8 RGB -> (``lq`` (H/scale)x(W/scale)x3 uint8, JSON-able ``meta``)."""
    _check_inputs(gt, cfg, seed)
    h, w = gt.shape[:2]
    meta = {"seed": int(seed), "kind": cfg.kind, "scale": cfg.scale, "gt_size": [h, w]}
    if cfg.kind == "bicubic":
        return bicubic_downscale(gt, cfg.scale), meta
    rng = np.random.default_rng(seed)
    img = gt.astype(np.float32) / 255.0
    lq_hw = (h // cfg.scale, w // cfg.scale)
    # Stage 1 resizes relative to gt, stage 2 relative to the lq size (as Real-ESRGAN does).
    img, meta["stage1"] = _degrade_stage(rng, img, cfg.stage1, (h, w), with_jpeg=True)
    img, meta["stage2"] = _degrade_stage(rng, img, cfg.stage2, lq_hw, with_jpeg=False)
    img, meta["final"] = _final_step(rng, img, cfg, lq_hw)
    return _to_uint8(img), meta


def bicubic_downscale(gt: np.ndarray, scale: int) -> np.ndarray:
    """Antialiased bicubic downscale of an HxWx3 uint8 image by an integer ``scale``."""
    h, w = gt.shape[:2]
    x = _to_tensor(gt.astype(np.float32) / 255.0)
    y = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", antialias=True)
    return _to_uint8(_to_numpy(y))


def _check_inputs(gt, cfg, seed) -> None:
    if not isinstance(gt, np.ndarray) or gt.dtype != np.uint8 or gt.ndim != 3 or gt.shape[2] != 3:
        got = f"{gt.dtype} {gt.shape}" if isinstance(gt, np.ndarray) else type(gt).__name__
        raise ValueError(f"gt must be an HxWx3 uint8 RGB array, got {got}")
    problems = cfg.all_problems()
    if problems:
        lines = "; ".join(f"{key}: {msg}" for key, msg in problems)
        raise ValueError(f"bad DegradationConfig: {lines}")
    h, w = gt.shape[:2]
    if h % cfg.scale or w % cfg.scale:
        raise ValueError(f"gt size {h}x{w} must be divisible by scale={cfg.scale}; crop it first")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _degrade_stage(rng, img, stage: Stage1Config, base_hw, with_jpeg: bool):
    """One order of the degradation model (paper Eq. 1): blur, resize, noise, [JPEG]."""
    meta: dict = {"blur": None}
    if rng.random() < stage.blur_prob:
        meta["blur"] = _sample_stage_kernel(rng, stage)
        img = _filter(img, make_kernel(meta["blur"]))
    img, meta["resize"] = _random_resize(rng, img, stage, base_hw)
    img, meta["noise"] = _add_noise(rng, img, stage)
    if with_jpeg:
        meta["jpeg_quality"] = _sample_quality(rng, stage.jpeg_range)
        img = _jpeg(img, meta["jpeg_quality"])
    return img, meta


def _sample_stage_kernel(rng, stage: Stage1Config) -> dict:
    """Sec. 3.1/3.3: a sinc kernel with ``sinc_prob`` (cutoff range tied to the kernel size, as
    in Real-ESRGAN for sizes 7..21), else a kernel type drawn from ``kernel_list``."""
    size = sample_size(rng, stage.min_kernel_size, stage.blur_kernel_size)
    if rng.random() < stage.sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sample_sinc_params(rng, size, (low, math.pi))
    return sample_blur_params(
        rng,
        size,
        stage.kernel_list,
        stage.kernel_prob,
        stage.blur_sigma,
        stage.betag_range,
        stage.betap_range,
    )


def _random_resize(rng, img, stage: Stage1Config, base_hw):
    """Sec. 3.1 "Resize": up/down/keep by ``resize_prob``, factor uniform in [1, max] or
    [min, 1] of ``base_hw``, interpolation mode uniform over area/bilinear/bicubic."""
    probs = np.asarray(stage.resize_prob, dtype=np.float64)
    direction = RESIZE_DIRECTIONS[int(rng.choice(3, p=probs / probs.sum()))]
    low, high = stage.resize_range
    if direction == "up":
        factor = float(rng.uniform(1.0, high))
    elif direction == "down":
        factor = float(rng.uniform(low, 1.0))
    else:
        factor = 1.0
    mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
    size = [max(1, int(base_hw[0] * factor)), max(1, int(base_hw[1] * factor))]
    meta = {"direction": direction, "factor": factor, "mode": mode, "size": size}
    return _resize(img, size, mode), meta


def _add_noise(rng, img, stage: Stage1Config):
    """Sec. 3.1 "Noise": Gaussian with ``gaussian_noise_prob`` else Poisson; grey (the same
    noise on all channels) with ``gray_noise_prob``; clipped to [0, 1]."""
    gaussian = bool(rng.random() < stage.gaussian_noise_prob)
    gray = bool(rng.random() < stage.gray_noise_prob)
    if gaussian:
        sigma = float(rng.uniform(*stage.noise_range))  # on the 0..255 scale
        shape = (*img.shape[:2], 1) if gray else img.shape
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
        meta = {"type": "gaussian", "sigma": sigma, "gray": gray}
    else:
        scale = float(rng.uniform(*stage.poisson_scale_range))
        base = (img @ GRAY_WEIGHTS)[..., None] if gray else img
        noise = _poisson_noise(rng, base) * np.float32(scale)
        meta = {"type": "poisson", "scale": scale, "gray": gray}
    return np.clip(img + noise, 0.0, 1.0), meta


def _poisson_noise(rng, img: np.ndarray) -> np.ndarray:
    """Shot noise: counts ~ Poisson(img * levels), with levels = the next power of two of the
    number of distinct 8-bit values (as BasicSR); returns counts / levels - img. Like BasicSR,
    a flat image (one value, levels = 1) gets very strong noise; real photos get ~256 levels."""
    quantized = np.clip(np.round(img * 255.0), 0, 255) / 255.0
    levels = 2.0 ** math.ceil(math.log2(len(np.unique(quantized))))
    return (rng.poisson(quantized * levels) / levels - quantized).astype(np.float32)


def _final_step(rng, img, cfg: DegradationConfig, lq_hw):
    """Sec. 3.3: [resize back to lq size + sinc filter (``final_sinc_prob``)] and the second
    JPEG (``stage2.jpeg_range``), in either order with probability 1/2."""
    order = FINAL_ORDERS[int(rng.integers(2))]
    mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
    sinc = None
    if rng.random() < cfg.final_sinc_prob:
        size = sample_size(rng, cfg.stage2.min_kernel_size, cfg.stage2.blur_kernel_size)
        sinc = sample_sinc_params(rng, size, (math.pi / 3, math.pi))
    quality = _sample_quality(rng, cfg.stage2.jpeg_range)
    if order == "jpeg_resize_sinc":
        img = _jpeg(img, quality)
    img = _resize(img, list(lq_hw), mode)
    if sinc is not None:
        img = _filter(img, make_kernel(sinc))
    if order == "resize_sinc_jpeg":
        img = _jpeg(img, quality)
    meta = {"order": order, "resize_mode": mode, "sinc": sinc, "jpeg_quality": quality}
    return img, meta


def _sample_quality(rng, jpeg_range) -> int:
    return int(rng.integers(jpeg_range[0], jpeg_range[1], endpoint=True))


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through OpenCV (which expects BGR) at integer ``quality``."""
    bgr = np.ascontiguousarray(_to_uint8(img)[..., ::-1])
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode a {bgr.shape} image")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with ``kernel`` with reflect padding, like BasicSR's filter2D.
    Padding is done by numpy, which also handles kernels larger than the image."""
    pad = kernel.shape[0] // 2
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = cv2.filter2D(padded, -1, kernel.astype(np.float32), borderType=cv2.BORDER_CONSTANT)
    return out[pad : pad + img.shape[0], pad : pad + img.shape[1]]


def _resize(img: np.ndarray, size, mode: str) -> np.ndarray:
    """``F.interpolate`` to ``size`` (h, w) with Real-ESRGAN's modes (no antialias)."""
    extra = {} if mode == "area" else {"align_corners": False}
    return _to_numpy(F.interpolate(_to_tensor(img), size=tuple(size), mode=mode, **extra))


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))[None]


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x[0].numpy().transpose(1, 2, 0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
