"""FASRer, FKdiff's Frequency-Aware Transformer student (paper 000, Sec. 3.2).

CFGA (Sec. 3.2.1), on a block input X (after a channel LayerNorm, as every Transformer block):
    Z' = L(Z);  X' = fuse(X, Z')  (the text: "element-wise multiplied and added", X * a + b;
                                  the equation writes Concat; we follow the text)
    F_q, F_k, F_v = W_{q,k,v} X'                                (1x1 conv)
    A = IFFT( FFT(F_q) * conj(FFT(F_k)) )    per p x p patch    (``fft_attention``)
    V_att = Norm(A) * F_v;   X_CFGA = X + Conv1x1(V_att)
FFFN (Sec. 3.2.2):
    X_F = Concat(Norm(X_CFGA), L(Z))        (Z' broadcast over the pixels)
    X_F^f = FFT(Patch(Conv1x1(X_F)));  X'_F = IFFT(W * X_F^f)    (W: learnable filter per
                                                                  channel and frequency)
    X_FFFN = GELU(Unpatch(X'_F)) + X_CFGA

The network is a 3-level encoder-decoder (Sec. 4.1) with ``blocks`` = [level 1, level 2,
level 3, refinement]; each decoder level repeats its encoder level's count (Restormer layout).
``forward(lq, z) -> (sr, feats)``: the 4 paired-layer features are the outputs of the three
encoder groups and of the refinement group (``feature_channels``, strides 1, 2, 4, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.fkdiff.common import (
    FEATURE_STRIDES,
    LayerNorm2d,
    PriorModulation,
    UShape,
    run_padded,
)
from distsr.models.fkdiff.config import FASRerConfig


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/p, W/p, p, p)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"feature map {h}x{w} is not a multiple of the patch size {p}")
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)


def from_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H/p, W/p, p, p) -> (B, C, H, W)."""
    b, c, nh, nw, p, _ = x.shape
    return x.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * p, nw * p)


def fft_attention(q: torch.Tensor, k: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
    """``A = IFFT(FFT(q) * conj(FFT(k)))`` over the last two dims, per ``patch_size`` patch.

    By the correlation theorem this is the circular cross-correlation of each patch of q with
    the same patch of k, channel by channel: ``A[u, v] = sum_{m, n} q[m + u, n + v] k[m, n]``
    (indices mod p). Half precision is computed in float32 (its FFTs need power-of-2 sizes)."""
    dtype = q.dtype
    if patch_size is not None:
        q, k = to_patches(q, patch_size), to_patches(k, patch_size)
    size = q.shape[-2:]
    qf, kf = torch.fft.rfft2(at_least_fp32(q)), torch.fft.rfft2(at_least_fp32(k))
    a = torch.fft.irfft2(qf * kf.conj(), s=size)
    return (from_patches(a) if patch_size is not None else a).to(dtype)


class CFGA(nn.Module):
    """Condensed-features guided attention (returns X_CFGA)."""

    def __init__(self, dim: int, prior_dim: int, patch: int, heads: int, bias: bool):
        super().__init__()
        self.patch = patch
        self.norm_in = LayerNorm2d(dim)
        self.prior = PriorModulation(prior_dim, dim)  # Z' = L(Z), fused as X * a + b
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)  # W_q, W_k, W_v
        self.norm_att = LayerNorm2d(dim, groups=heads)  # Norm(A)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.prior(self.norm_in(x), z)).chunk(3, dim=1)
        v_att = self.norm_att(fft_attention(q, k, self.patch)) * v
        return x + self.proj(v_att)


class FFFN(nn.Module):
    """Frequency-filter-driven feed-forward network (returns X_FFFN)."""

    def __init__(self, dim: int, prior_dim: int, patch: int, bias: bool):
        super().__init__()
        self.patch = patch
        self.norm = LayerNorm2d(dim)
        self.prior = nn.Linear(prior_dim, dim, bias=False)  # Z' = L(Z)
        self.project = nn.Conv2d(2 * dim, dim, 1, bias=bias)
        self.filter = nn.Parameter(torch.ones(dim, 1, 1, patch, patch // 2 + 1))  # W

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z_map = self.prior(z)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        x_f = self.project(torch.cat([self.norm(x), z_map], dim=1))
        patches = to_patches(x_f, self.patch)
        spec = torch.fft.rfft2(at_least_fp32(patches)) * self.filter
        x_f = from_patches(torch.fft.irfft2(spec, s=(self.patch, self.patch))).to(x.dtype)
        return F.gelu(x_f) + x


class FASRerBlock(nn.Module):
    def __init__(self, dim: int, cfg: FASRerConfig):
        super().__init__()
        prior_dim = 4 * cfg.prior_channels
        self.cfga = CFGA(dim, prior_dim, cfg.patch_size, cfg.heads, cfg.bias)
        self.fffn = FFFN(dim, prior_dim, cfg.patch_size, cfg.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.fffn(self.cfga(x, z), z)


class FASRer(nn.Module):
    """``forward(lq, z) -> (sr, feats)``; z is the compact prior (sampled, or the teacher's)."""

    feature_strides = FEATURE_STRIDES

    def __init__(self, cfg: FASRerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FASRerConfig()
        self.body = UShape(
            cfg.dim,
            cfg.blocks[:3],
            cfg.blocks[3],
            lambda width, level: FASRerBlock(width, cfg),
            reduce_level1=True,
            scale=cfg.scale,
            in_channels=cfg.in_channels,
            bias=cfg.bias,
        )
        self.scale = cfg.scale
        self.feature_channels: list[int] = self.body.feature_channels
        self.size_multiple = self.body.size_multiple * cfg.patch_size  # lq sides padded to this

    def forward(self, lq: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_padded(self.body, lq, z, self.size_multiple)
