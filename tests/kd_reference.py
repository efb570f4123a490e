"""The output-distillation losses of METHODS.md §3-4 written out directly, in float64, with a
hand Haar DWT: the reference the recipes' losses are checked against (not their logged parts).

Haar on each 2x2 block [[a, b], [c, d]]: LL = (a+b+c+d)/2 and the three detail bands
(a+b-c-d)/2, (a-b+c-d)/2, (a-b-c+d)/2 (orthonormal; a band's L1 does not depend on its sign or
on which of LH / HL it is called). Sizes here are multiples of 2^J, so no padding enters.
"""

from __future__ import annotations

import torch

# float32 losses (means over ~10^4 elements, pairwise-summed, plus a few DWT products) against
# this float64 reference: ~1e-6 relative measured; 1e-5 leaves room for other CPUs' kernels and
# fails on any wrong weight or term (tens of percent).
RTOL = 1e-5


def haar(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, [(a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2]


def haar_levels(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, dict[int, list]]:
    """(LL_J, {j: the 3 detail bands of level j}), j = 1 the finest."""
    details = {}
    for j in range(1, levels + 1):
        x, details[j] = haar(x)
    return x, details


def l1(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean()


def dtkd_kd(sr, tch, levels: int = 2, weights=(1.0, 2.0, 1.0)) -> torch.Tensor:
    """DTKD: w_LF L1(LL_J) + w_MF mean L1(details of levels 2..J) + w_HF mean L1(level 1)."""
    low, det = haar_levels(sr.double() - tch.double(), levels)
    w_lf, w_mf, w_hf = weights
    loss = w_lf * l1(low) + w_hf * torch.stack([l1(b) for b in det[1]]).mean()
    if levels > 1:
        mf = [l1(b) for j in range(2, levels + 1) for b in det[j]]
        loss = loss + w_mf * torch.stack(mf).mean()
    return loss


def mtkd_dwt(sr, mt_hr, levels: int = 1) -> torch.Tensor:
    """MTKD's L_DWT = 1/(3J+1) sum over the 3J+1 sub-bands of their L1."""
    low, det = haar_levels(sr.double() - mt_hr.double(), levels)
    bands = [low, *(b for j in det for b in det[j])]
    return sum(l1(b) for b in bands) / (3 * levels + 1)


def dtkd_loss(sr, gt, tch, lam: float, levels: int = 2, weights=(1.0, 2.0, 1.0)):
    """L = || sr - gt ||_1 + lambda(i) L_KD  (DTKD Sec. 3.5)."""
    return l1(sr.double() - gt.double()) + lam * dtkd_kd(sr, tch, levels, weights)


def mtkd_loss(sr, gt, mt_hr, task_weight: float, kd_weight: float, levels: int = 1):
    """MTKD Eq. 4 with the configured weights: task_weight || sr - gt ||_1 + kd_weight L_DWT."""
    return task_weight * l1(sr.double() - gt.double()) + kd_weight * mtkd_dwt(sr, mt_hr, levels)


def assert_loss(got: torch.Tensor | float, want: torch.Tensor, what: str) -> None:
    got, want = float(torch.as_tensor(got).detach()), float(want)
    assert abs(got - want) <= RTOL * abs(want), f"{what}: {got!r} vs reference {want!r}"
