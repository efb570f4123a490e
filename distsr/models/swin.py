"""Swin layers of the ResShift UNet (official ``models/swin_transformer.py`` layout).

Parameter and buffer names follow the official code so that released checkpoints load strictly.
Everything works on NCHW feature maps; facts are from conformance/resshift/README.md §1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(groups, C, eps=1e-5) computed in float32, returned in the input dtype.

    The official network always uses 32 groups (README §1). ``groups`` exists for narrow UNets:
    with C = 32 channels, 32 groups hold one channel each, an instance norm that removes every
    feature map's spatial mean, so a flat input loses its level after the norm.
    """

    def __init__(self, channels: int, groups: int = 32):
        if groups < 1 or channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        super().__init__(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * nW, ws * ws, C]; windows row-major over the grid, tokens row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, ws * ws, C] -> [B, C, H, W]."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(-1, c, h, w)


def resshift_shift_mask(h: int, w: int, window_size: int, shift_size: int) -> torch.Tensor:
    """The official shifted-window mask, quirk included (README §1 "Swin shift-mask quirk").

    Row label f(r) = 0 if r < H-ws, 1 if H-ws <= r < H-s, 2 if r >= H-s. Token p = a*ws + b of
    window (wi, wj) gets the label f(wi*ws + b): its COLUMN offset is used as a row offset, and
    W / wj never matter. mask[n, p, q] = 0 for equal labels, else -100; float32 [nW, N, N].
    With shift_size == 0 the official rule labels every token alike, so the mask is all zeros.
    """
    ws, s = window_size, shift_size
    n_h, n_w = h // ws, w // ws
    rows = torch.arange(h)
    if s > 0:
        row_label = (rows >= h - ws).long() + (rows >= h - s).long()
    else:
        row_label = torch.zeros_like(rows)
    # label of token p = a*ws + b in window row wi is row_label[wi*ws + b]
    token_label = row_label.view(n_h, ws).repeat(1, ws)  # [nH, ws*ws]
    token_label = token_label[:, None, :].expand(n_h, n_w, ws * ws).reshape(n_h * n_w, ws * ws)
    same = token_label[:, :, None] == token_label[:, None, :]
    return torch.where(same, 0.0, -100.0).float()


def relative_position_index(ws: int) -> torch.Tensor:
    """Standard Swin index (dy + ws - 1) * (2ws - 1) + (dx + ws - 1), int64 [ws*ws, ws*ws]."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


class WindowAttention(nn.Module):
    """Window MSA with a learned relative position bias (qkv / proj are nn.Linear)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin embed dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        n_rel = (2 * window_size - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * nW, N, C]; mask: [nW, N, N] added to the logits, broadcast over heads."""
        bn, n, c = x.shape
        qkv = self.qkv(x).view(bn, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B*nW, heads, N, d]
        idx = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)
        if mask is None:
            attn_bias = bias.unsqueeze(0)
        else:
            n_win = mask.shape[0]
            attn_bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # [nW, heads, N, N]
            attn_bias = attn_bias.unsqueeze(0).expand(bn // n_win, -1, -1, -1, -1)
            attn_bias = attn_bias.reshape(bn, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias.to(q.dtype), scale=self.scale
        )
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


class Mlp(nn.Module):
    """1x1 Conv(C -> hC) -> GELU (erf) -> 1x1 Conv(hC -> C), on NCHW maps."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """x + WMSA(GN(x)) with cyclic shift, then x + MLP(GN(x)); NCHW in and out."""

    def __init__(
        self,
        dim,
        input_resolution,
        num_heads,
        window_size=8,
        shift_size=0,
        mlp_ratio=4.0,
        norm_groups=32,
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        # construction-time clamp: it depends on image_size, never on the runtime size (README §1)
        if min(self.input_resolution) <= window_size:
            window_size, shift_size = min(self.input_resolution), 0
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must lie in [0, window_size={window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = GroupNorm32(dim, norm_groups)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = GroupNorm32(dim, norm_groups)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # stored for checkpoint compatibility only: the official block never reads it (README §1)
        mask = resshift_shift_mask(*self.input_resolution, window_size, shift_size)
        self.register_buffer("attn_mask", mask if shift_size > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        ws, s = self.window_size, self.shift_size
        if h % ws or w % ws:
            raise ValueError(
                f"Swin feature map {h}x{w} is not a multiple of the window size {ws}; "
                "pad the UNet input so every Swin level divides by the window"
            )
        y = self.norm1(x)
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(2, 3))
        mask = None
        if s > 0:  # recomputed for the actual size on every forward (README §1, quirk 1)
            mask = resshift_shift_mask(h, w, ws, s).to(device=x.device, dtype=x.dtype)
        y = window_reverse(self.attn(window_partition(y, ws), mask), ws, h, w)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """1x1 conv into the Swin width (patch size 1), optional GroupNorm."""

    def __init__(
        self, in_chans: int, embed_dim: int, patch_norm: bool = False, norm_groups: int = 32
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 1)
        self.norm = GroupNorm32(embed_dim, norm_groups) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PatchUnEmbed(nn.Module):
    """1x1 conv back to the UNet width, optional GroupNorm."""

    def __init__(
        self, out_chans: int, embed_dim: int, patch_norm: bool = False, norm_groups: int = 32
    ):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, out_chans, 1)
        self.norm = GroupNorm32(out_chans, norm_groups) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class BasicLayer(nn.Module):
    """patch_embed -> `depth` Swin blocks (odd ones shifted by ws // 2) -> patch_unembed.

    There is no residual around the layer: it replaces its input (README §1).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        num_heads: int,
        window_size: int,
        depth: int = 2,
        img_size: int = 64,
        mlp_ratio: float = 4.0,
        patch_norm: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_norm, norm_groups)
        self.patch_unembed = PatchUnEmbed(in_chans, embed_dim, patch_norm, norm_groups)
        res = (img_size, img_size)
        shifts = [0 if i % 2 == 0 else window_size // 2 for i in range(depth)]  # odd blocks shift
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(embed_dim, res, num_heads, window_size, s, mlp_ratio, norm_groups)
            for s in shifts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)
