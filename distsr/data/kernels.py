"""Blur kernels of Real-ESRGAN's degradation model (Wang et al., 2021, Sec. 3.1 "Blur").

Two layers: ``*_kernel`` functions build a kernel from explicit parameters, and ``sample_*``
functions draw those parameters from an explicit ``np.random.Generator`` and return them as a
plain dict that ``make_kernel`` turns back into the kernel (so a degradation's ``meta`` is
enough to rebuild every kernel it used). All kernels are float64, odd-sized and sum to 1.

Shapes, with ``q = x^T Sigma^-1 x`` for the rotated covariance ``Sigma = R diag(sx^2, sy^2) R^T``:
Gaussian ``exp(-q / 2)``, generalized Gaussian ``exp(-q^beta / 2)``, plateau ``1 / (1 + q^beta)``;
the sinc (circular low-pass) kernel is ``wc J1(wc r) / (2 pi r)`` (paper Eq. 4).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 1, got {size}")


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """``q(x, y)`` on a ``size x size`` grid centred at 0 (x = column, y = row offset)."""
    _check_size(size)
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be > 0, got {sigma_x}, {sigma_y}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinates in the frame of the kernel's principal axes
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalize(kernel: np.ndarray) -> np.ndarray:
    return kernel / kernel.sum()


def gaussian_kernel(size, sigma_x, sigma_y=None, theta=0.0) -> np.ndarray:
    """Isotropic (``sigma_y=None``) or anisotropic, rotated Gaussian kernel."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalize(np.exp(-0.5 * q))


def generalized_gaussian_kernel(size, sigma_x, sigma_y=None, theta=0.0, beta=1.0) -> np.ndarray:
    """Generalized Gaussian; ``beta=1`` is the Gaussian, larger ``beta`` a flatter top."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalize(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(size, sigma_x, sigma_y=None, theta=0.0, beta=1.0) -> np.ndarray:
    """Plateau-shaped kernel ``1 / (1 + q^beta)`` (heavier tails than the Gaussian)."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalize(1.0 / (1.0 + np.power(q, beta)))


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """2-D circular low-pass (sinc) kernel with cutoff ``omega_c`` in radians (pi = Nyquist);
    it produces the ringing and overshoot artifacts of the paper's Sec. 3.3."""
    _check_size(size)
    if not 0 < omega_c <= math.pi:
        raise ValueError(f"sinc cutoff omega_c must be in (0, pi], got {omega_c}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    r = np.hypot(*np.meshgrid(ax, ax))
    r[size // 2, size // 2] = 1.0  # placeholder; the centre takes the limit below
    kernel = omega_c * special.j1(omega_c * r) / (2 * math.pi * r)
    kernel[size // 2, size // 2] = omega_c**2 / (4 * math.pi)  # lim r->0 of the formula
    return _normalize(kernel)


def make_kernel(params: dict) -> np.ndarray:
    """Rebuild a kernel from the dict a ``sample_*`` function returned."""
    kind, size = params["type"], params["size"]
    if kind == "sinc":
        return sinc_kernel(size, params["omega_c"])
    sx, sy, theta = params["sigma_x"], params["sigma_y"], params["theta"]
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sx, sy, theta)
    if kind in ("generalized_iso", "generalized_aniso"):
        return generalized_gaussian_kernel(size, sx, sy, theta, params["beta"])
    if kind in ("plateau_iso", "plateau_aniso"):
        return plateau_kernel(size, sx, sy, theta, params["beta"])
    raise ValueError(f"unknown kernel type {kind!r}; valid: {', '.join(KERNEL_TYPES)}, sinc")


def sample_size(rng: np.random.Generator, min_size: int, max_size: int) -> int:
    """An odd kernel size drawn uniformly from ``min_size, min_size + 2, ..., max_size``."""
    _check_size(min_size)
    _check_size(max_size)
    return int(rng.choice(np.arange(min_size, max_size + 1, 2)))


def sample_beta(rng: np.random.Generator, beta_range) -> float:
    """Shape ``beta``: when the range straddles 1, half the draws fall in [min, 1] and half in
    [1, max] (as Real-ESRGAN does), else uniform over the range."""
    lo, hi = beta_range
    if lo < 1.0 < hi:
        return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi))
    return float(rng.uniform(lo, hi))


def sample_blur_params(
    rng, size, kernel_list, kernel_prob, sigma_range, betag_range, betap_range
) -> dict:
    """Pick a kernel type by ``kernel_prob`` and draw its sigmas, rotation in [-pi, pi] and
    shape ``beta``; isotropic types get ``sigma_y = sigma_x`` and ``theta = 0``."""
    if len(kernel_list) != len(kernel_prob) or not kernel_list:
        raise ValueError(f"kernel_list {kernel_list} and kernel_prob {kernel_prob} must match")
    weights = np.asarray(kernel_prob, dtype=np.float64)
    kind = str(kernel_list[rng.choice(len(kernel_list), p=weights / weights.sum())])
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; valid: {', '.join(KERNEL_TYPES)}")
    params = {"type": kind, "size": int(size), "sigma_x": float(rng.uniform(*sigma_range))}
    if kind.endswith("aniso"):
        params["sigma_y"] = float(rng.uniform(*sigma_range))
        params["theta"] = float(rng.uniform(-math.pi, math.pi))
    else:
        params["sigma_y"], params["theta"] = params["sigma_x"], 0.0
    if kind.startswith("generalized"):
        params["beta"] = sample_beta(rng, betag_range)
    elif kind.startswith("plateau"):
        params["beta"] = sample_beta(rng, betap_range)
    return params


def sample_sinc_params(rng: np.random.Generator, size: int, omega_range) -> dict:
    """A sinc kernel of the given size with cutoff drawn uniformly from ``omega_range``."""
    return {"type": "sinc", "size": int(size), "omega_c": float(rng.uniform(*omega_range))}
