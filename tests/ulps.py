"""Float comparisons in units in the last place (ulps).

Bit-equality holds only where every operation is exactly rounded (IEEE +, -, *, / and casts).
Vectorised transcendental kernels (sqrt, exp, log, pow through Sleef or MKL VML) and vectorised
reductions are not: their last bit depends on the CPU and on the kernel the library picks for
it, so results recorded on one machine are compared within a stated number of ulps.
"""

from __future__ import annotations

import torch


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 bits as integers that count ulps: consecutive floats differ by 1 (sign folded)."""
    bits = x.contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise number of float32 values between ``actual`` and ``expected``."""
    return (_ordered(actual) - _ordered(expected)).abs()


def assert_close_ulps(actual, expected, ulps: int, *, scale: str = "element", msg: str = ""):
    """``actual`` equals ``expected`` (float32) within ``ulps`` ulps.

    ``scale="element"``: ulps of each element (for values computed directly by a kernel).
    ``scale="tensor"``: ulps of the largest |expected| of the tensor, i.e. an absolute bound
    ``ulps * ulp(max|expected|)``. Use it for results of sums and differences: a one-ulp change
    of an operand becomes many ulps of an element that cancels to near zero, while staying a
    fraction of an ulp at the tensor's scale.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.dtype == expected.dtype == torch.float32, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    if scale == "element":
        dist = ulp_distance(actual, expected)
    elif scale == "tensor":
        top = expected.abs().max()
        ulp = torch.nextafter(top, torch.tensor(float("inf"))) - top
        dist = (actual.double() - expected.double()).abs() / ulp.double()
    else:
        raise ValueError(f"scale must be 'element' or 'tensor', got {scale!r}")
    worst = dist.max().item() if dist.numel() else 0
    where = f"{msg}: " if msg else ""
    assert worst <= ulps, f"{where}{worst:g} ulps apart (at most {ulps} allowed)"


def float32_rounding_margin(values) -> float:
    """How far float64 ``values`` lie from a float32 rounding boundary, in float64 ulps.

    A float64 result of libm/NumPy pow, exp or log may differ by an ulp between machines; its
    float32 cast is the same everywhere when this margin is large."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    f = x.float()
    up = torch.nextafter(f, torch.tensor(float("inf"))).double()
    down = torch.nextafter(f, torch.tensor(float("-inf"))).double()
    boundaries = torch.stack([(f.double() + up) / 2, (f.double() + down) / 2])
    ulp64 = torch.nextafter(x.abs(), torch.tensor(float("inf"), dtype=torch.float64)) - x.abs()
    return ((boundaries - x).abs().min(dim=0).values / ulp64).min().item()
