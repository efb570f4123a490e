"""TAD-SR's time-aware discriminator on the frozen teacher's encoder features (paper 002 Eq. 9-10,
METHODS.md §2).

Per scale k:  F_hat_k = Norm(F_k) * (1 + gamma_k(t)) + beta_k(t)                       (Eq. 10)
with [gamma_k | beta_k] = Linear_k(SiLU(sinusoidal(t))); then the head D_k: SiLU -> zero-init 3x3
conv -> tokens [B, C, H*W] -> spectral-norm 1-D conv head (k=1 block, residual circular k=9
block, each conv -> GroupNorm(4) -> LeakyReLU(0.2); residual (f(x) + x) / sqrt(2)) -> k=1
spectral-norm projection to per-token logits.

Facts of the official code (LearningHx/TAD-SR ``models/unet.py``: ``ProjectedDiscriminator``,
``DiscHead``, built in ``trainer.py`` as ``ProjectedDiscriminator(c_dim=64, embed_dim=160)``):
features are the UNet skips after input blocks 3, 6, 9, 11 plus the middle block (160, 320,
320, 640, 640 channels for the released real-SR x4 UNet); t enters as the bare sinusoidal
embedding of width 160 (no MLP); the modulation Linear keeps PyTorch's default init (distsr
zero-initialises it by default, so training starts from the identity modulation F_hat =
Norm(F)); Norm is GroupNorm(32); the 3x3 conv is zero-initialised; heads keep the feature width
and emit 64 logits per token (``c_dim``). ``OFFICIAL_DISC_KWARGS`` reproduces that head. One
numerical difference remains: the official spectral norm is the hook-based
``torch.nn.utils.spectral_norm`` (random u, v, one power iteration per forward), distsr uses the
parametrization, which also runs 15 power iterations when it is built, so sigma starts converged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distsr.models.resshift_unet import timestep_embedding

__all__ = [
    "OFFICIAL_DISC_KWARGS",
    "TimeAwareDiscriminator",
]

# Constructor kwargs (besides feature_channels) of the official head, see the module docstring.
OFFICIAL_DISC_KWARGS: dict = {
    "time_embed_dim": 160,
    "hidden": None,
    "logit_channels": 64,
    "zero_init_modulation": False,
}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _spectral_conv1d(c_in: int, c_out: int, kernel_size: int) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12)


def _token_block(c_in: int, c_out: int, kernel_size: int) -> nn.Sequential:
    """Spectral-norm circular conv1d -> GroupNorm(4) -> LeakyReLU(0.2) (official make_block)."""
    return nn.Sequential(
        _spectral_conv1d(c_in, c_out, kernel_size),
        nn.GroupNorm(math.gcd(4, c_out), c_out),
        nn.LeakyReLU(0.2),
    )


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class TimeModulation(nn.Module):
    """F_hat = Norm(F) * (1 + gamma(t)) + beta(t), [gamma | beta] = Linear(SiLU(emb)) (Eq. 10)."""

    def __init__(self, channels: int, time_embed_dim: int, zero_init: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * channels))
        if zero_init:
            nn.init.zeros_(self.emb_layers[1].weight)
            nn.init.zeros_(self.emb_layers[1].bias)

    def forward(self, feature: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dtype = self.emb_layers[1].weight.dtype  # run in the discriminator's own dtype
        gamma, beta = self.emb_layers(emb.to(dtype)).chunk(2, dim=1)  # scale first (official)
        return self.norm(feature.to(dtype)) * (1 + gamma[..., None, None]) + beta[..., None, None]


class TokenHead(nn.Module):
    """D_k: SiLU -> zero-init 3x3 conv -> tokens -> spectral-norm 1-D head -> per-token logits."""

    def __init__(self, channels: int, hidden: int | None, logit_channels: int, kernel_size: int):
        super().__init__()
        width = hidden or channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)  # official zero_module
        nn.init.zeros_(self.conv.bias)
        self.main = nn.Sequential(
            _token_block(channels, width, 1),
            _Residual(_token_block(width, width, kernel_size)),
        )
        self.cls = _spectral_conv1d(width, logit_channels, 1)

    def forward(self, f_hat: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(F.silu(f_hat)).flatten(2)  # [B, C, H*W]
        return self.cls(self.main(tokens)).flatten(1)  # [B, logit_channels * H*W]


class TimeAwareDiscriminator(nn.Module):
    """Multi-scale time-aware discriminator (paper Eq. 10-12): one modulation + head per scale.

    ``forward(features, t)`` takes the teacher's encoder features (``Teacher.features``), one
    [B, C_k, H_k, W_k] tensor per entry of ``feature_channels``, and integer steps ``t`` (int or
    [B]), and returns per-scale logits [B, logit_channels * H_k * W_k] (official layout). ``hidden``
    is the width of the 1-D head (None: the feature width, as official).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        time_embed_dim: int = 128,
        hidden: int | None = 64,
        logit_channels: int = 1,
        kernel_size: int = 9,
        zero_init_modulation: bool = True,
    ):
        super().__init__()
        problems = []
        if not feature_channels or not all(_positive_int(c) for c in feature_channels):
            problems.append(f"feature_channels must be positive ints, got {feature_channels!r}")
        if not _positive_int(time_embed_dim) or time_embed_dim < 2:
            problems.append(f"time_embed_dim must be an int >= 2, got {time_embed_dim!r}")
        if hidden is not None and not _positive_int(hidden):
            problems.append(f"hidden must be a positive int or None, got {hidden!r}")
        if not _positive_int(logit_channels):
            problems.append(f"logit_channels must be a positive int, got {logit_channels!r}")
        if not _positive_int(kernel_size) or kernel_size % 2 == 0:
            problems.append(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if problems:
            raise ValueError("TimeAwareDiscriminator: " + "; ".join(problems))
        self.feature_channels = [int(c) for c in feature_channels]
        self.time_embed_dim = time_embed_dim
        self.modulations = nn.ModuleList(
            TimeModulation(c, time_embed_dim, zero_init_modulation) for c in self.feature_channels
        )
        self.heads = nn.ModuleList(
            TokenHead(c, hidden, logit_channels, kernel_size) for c in self.feature_channels
        )

    def _check(self, features: Sequence[torch.Tensor], t) -> torch.Tensor:
        if isinstance(features, torch.Tensor) or len(features) != len(self.feature_channels):
            n = 1 if isinstance(features, torch.Tensor) else len(features)
            raise ValueError(
                f"expected a list of {len(self.feature_channels)} feature maps (channels "
                f"{self.feature_channels}), got {n}"
            )
        got = [tuple(f.shape) for f in features]
        if any(f.ndim != 4 for f in features) or [s[1] for s in got] != self.feature_channels:
            raise ValueError(
                f"features must be [B, C_k, H, W] with C_k = "
                f"{self.feature_channels}, got shapes {got}"
            )
        batch = features[0].shape[0]
        if any(s[0] != batch for s in got):
            raise ValueError(f"features differ in batch size: {got}")
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"t must hold integer step indices, got dtype {t.dtype}")
        t = torch.as_tensor(t, dtype=torch.long, device=features[0].device)
        t = t.expand(batch) if t.dim() == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"t must be an int or of shape [{batch}], got {tuple(t.shape)}")
        return t

    def modulate(self, features: Sequence[torch.Tensor], t) -> list[torch.Tensor]:
        """The time-modulated features F_hat_k (paper Eq. 10)."""
        t = self._check(features, t)
        emb = timestep_embedding(t, self.time_embed_dim)
        return [mod(f, emb) for mod, f in zip(self.modulations, features)]

    def forward(self, features: Sequence[torch.Tensor], t) -> list[torch.Tensor]:
        return [head(f_hat) for head, f_hat in zip(self.heads, self.modulate(features, t))]
