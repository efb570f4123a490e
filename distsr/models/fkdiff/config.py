"""Typed configs of FKdiff's networks (Chen, paper 000; METHODS.md §5) and the paper presets.

* ``FKdiffNetConfig``: the teacher restorer, DiffIR-S1's U-shaped Restormer (DIRformer) whose
  attention and feed-forward are modulated by the compact prior Z. The paper's teacher is
  "DiffIRS1" (Sec. 4.1); ``TEACHER_PAPER`` is DiffIR's official RealSR x4 stage-1 setting
  (dim 64, blocks [13, 1, 1, 1], 13 refinement blocks, heads [1, 2, 4, 8], FFN x2.2, bias-free
  LayerNorm).
* ``CFEConfig``: CFE_D / CFE_R (DiffIR's CPEN; 9 residual blocks in its x4 setting).
* ``FASRerConfig``: the student (Sec. 3.2): a 3-level encoder-decoder of CFGA + FFFN blocks;
  ``blocks`` = [level 1, level 2, level 3 (bottleneck), refinement], FASRer_L [8, 2, 2, 2] and
  FASRer_S [6, 1, 1, 2] (Sec. 4.1). The paper does not give the width or the patch size: the
  presets take DiffIR's width (64, as the CFE's C') and FFTformer's patch size 8 (its [11]).
* ``PriorConfig``: the compact-prior diffusion (Sec. 3.1): T = 4, DiffIR's beta range
  (0.1 -> 0.99, LDM "linear" rule) and its MLP denoiser (width 4 C', 2 layers).

Every config is built from a plain dict with ``distsr.config.from_dict`` (validation included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal


def _positive(obj, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(k, f"must be >= 1, got {getattr(obj, k)}") for k in keys if getattr(obj, k) < 1]


@dataclass
class CFEConfig:
    """The condensed feature extractor (DiffIR's CPEN): convs + residual blocks + pooling + MLP."""

    prior_channels: int = 64  # C'; the prior vector Z has 4 C' entries
    res_blocks: int = 9  # DiffIR x4: n_encoder_res = 9

    def validate(self) -> list[tuple[str, str]]:
        return _positive(self, ("prior_channels",)) + (
            [("res_blocks", "must be >= 0")] if self.res_blocks < 0 else []
        )


@dataclass
class FKdiffNetConfig:
    """The teacher restorer conditioned on Z (DiffIR-S1 generator)."""

    dim: int = 64
    blocks: list[int] = field(default_factory=lambda: [13, 1, 1, 1])  # per level, 4 levels
    refinement_blocks: int = 13
    heads: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ffn_expansion: float = 2.2
    bias: bool = False
    layernorm: Literal["bias_free", "with_bias"] = "bias_free"
    prior_channels: int = 64
    scale: int = 4
    in_channels: int = 3

    def validate(self) -> list[tuple[str, str]]:
        problems = _positive(self, ("dim", "prior_channels", "scale", "in_channels"))
        if len(self.blocks) != 4 or min(self.blocks, default=0) < 1:
            problems.append(("blocks", f"must be 4 counts >= 1, got {self.blocks}"))
        if len(self.heads) != 4:
            problems.append(("heads", f"must be 4 head counts, got {self.heads}"))
        else:
            for i, h in enumerate(self.heads):
                if h < 1 or (self.dim * 2**i) % h:
                    problems.append((f"heads[{i}]", f"must divide the width {self.dim * 2**i}"))
        return problems


@dataclass
class FASRerConfig:
    """The FASRer student (CFGA + FFFN blocks in a 3-level encoder-decoder)."""

    dim: int = 64
    blocks: list[int] = field(default_factory=lambda: [8, 2, 2, 2])  # levels 1-3 + refinement
    patch_size: int = 8  # FFT patches of CFGA and FFFN
    heads: int = 1  # groups of channels that Norm(A) normalises separately
    bias: bool = False
    prior_channels: int = 64
    scale: int = 4
    in_channels: int = 3

    def validate(self) -> list[tuple[str, str]]:
        problems = _positive(self, ("dim", "patch_size", "heads", "prior_channels", "scale"))
        if len(self.blocks) != 4 or min(self.blocks, default=0) < 1:
            problems.append(("blocks", f"must be 4 counts >= 1, got {self.blocks}"))
        if self.heads >= 1 and self.dim % self.heads:
            problems.append(("heads", f"must divide dim={self.dim}"))
        return problems


@dataclass
class PriorConfig:
    """Diffusion on the compact prior vector Z (DDPM, T steps, denoiser conditioned on D, t)."""

    timesteps: int = 4  # T
    beta_start: float = 0.1
    beta_end: float = 0.99
    prior_channels: int = 64  # Z and D have 4 C' entries
    width: int = 256  # hidden width of the MLP denoiser (DiffIR: 4 C')
    depth: int = 1  # Linear + LeakyReLU layers after the input layer (DiffIR x4: n_denoise_res = 1)

    def validate(self) -> list[tuple[str, str]]:
        problems = _positive(self, ("timesteps", "prior_channels", "width"))
        if not 0 < self.beta_start <= self.beta_end < 1:
            problems.append(("beta_end", "need 0 < beta_start <= beta_end < 1"))
        if self.depth < 0:
            problems.append(("depth", "must be >= 0"))
        return problems


# Paper configurations (Sec. 4.1; teacher = DiffIR's RealSR x4 stage 1)
CFE_PAPER = CFEConfig()
TEACHER_PAPER = FKdiffNetConfig()
FASRER_L = FASRerConfig(blocks=[8, 2, 2, 2])
FASRER_S = FASRerConfig(blocks=[6, 1, 1, 2])
PRIOR_PAPER = PriorConfig()

# Tiny presets for tests (same structure, a few thousand parameters)
CFE_TINY = CFEConfig(prior_channels=8, res_blocks=1)
TEACHER_TINY = FKdiffNetConfig(dim=8, blocks=[1, 1, 1, 1], refinement_blocks=1, heads=[1, 1, 2, 2],
                               ffn_expansion=2.0, prior_channels=8)  # fmt: skip
FASRER_L_TINY = FASRerConfig(dim=8, blocks=[2, 1, 1, 1], patch_size=4, prior_channels=8)
FASRER_S_TINY = replace(FASRER_L_TINY, blocks=[1, 1, 1, 1])
PRIOR_TINY = PriorConfig(prior_channels=8, width=32, depth=1)
