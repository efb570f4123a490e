"""Per-sample teacher noise: one rule every process uses to regenerate a sample's z_T.

Sample ``key`` draws from a CPU ``torch.Generator`` seeded with ``stable_seed(seed, key)`` (draw
k > 0 of a cache with ``draws: K`` trajectories per sample: ``stable_seed(seed, key, k)``). A
sampler that consumes several latent-shaped tensors (the stochastic ResShift sampler: the prior
eps, then one eps per step) draws them one after another, each with its own ``torch.randn`` call,
so the prior eps is the same tensor whatever number of tensors follow it. (One ``randn`` of
shape ``[n, C, H, W]`` would not do: CPU ``randn`` fills 16 values at a time, so the first
``C*H*W`` values of a larger draw differ from a draw of ``[C, H, W]`` unless ``C*H*W`` is a
multiple of 16.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distsr.seeding import stable_seed


def sample_seed(seed: int, key: str, draw: int = 0) -> int:
    """The noise seed of trajectory ``draw`` of ``key`` (draw 0: ``stable_seed(seed, key)``)."""
    return stable_seed(seed, key) if draw == 0 else stable_seed(seed, key, draw)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], tensors: int = 1) -> torch.Tensor:
    """``[B, *shape]`` (``tensors == 1``) or ``[tensors, B, *shape]``: per sample, ``tensors``
    successive ``randn(shape)`` draws of a generator seeded with that sample's seed."""
    shape = tuple(int(s) for s in shape)
    per_sample = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        per_sample.append(torch.stack([torch.randn(shape, generator=gen) for _ in range(tensors)]))
    noise = torch.stack(per_sample, dim=1)  # [tensors, B, *shape]
    return noise[0] if tensors == 1 else noise


def noise_for(
    keys: Sequence[str], shape: Sequence[int], seed: int, tensors: int = 1, draw: int = 0
) -> torch.Tensor:
    """``noise_from_seeds`` for the samples ``keys`` (``shape``: one sample's shape)."""
    return noise_from_seeds([sample_seed(seed, k, draw) for k in keys], shape, tensors)
