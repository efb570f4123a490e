"""Geometric training augmentation: random flips and rotations, the same for a sample's lq, gt
and teacher-cache targets (``data.augment``, ``config.AugmentConfig``).

An element of the dihedral group D4 is three bits, applied in this order, as BasicSR's
``augment`` does (``data/transforms.py``, the ``use_hflip`` / ``use_rot`` of the MTKD training
options, paper 004 Sec. 4.2): hflip (reverse W), vflip (reverse H), transpose (swap H and W).
``hflip`` draws the first bit, ``rot90`` the other two, each with probability 1/2; with both on,
the 8 bit patterns are the 8 distinct elements of D4 (identity, 3 rotations, 4 reflections),
each drawn with probability 1/8.

The draw is a pure function of the sample's augmentation seed, which the reader keys like the
sample's crop seed by (run seed, rank, reader, shuffle block, index in the block): workers, ranks
and a resumed stream draw the same element for the same sample.

Teacher-cache targets. The reader transforms every cached tensor with spatial dims (``[..., H,
W]``: the outputs ``[K, C, H, W]``, ``z_gt`` and the stored condition) with the sample's element;
the int64 noise seeds stay. That stands in T(teacher(lq)) for teacher(T(lq)). T(teacher(lq)) is
the output of the conjugate teacher T o teacher o T^-1 on T(lq), whose error to T(gt) is the
teacher's own error to gt, exactly (and, for a sampler, T(eps) is as Gaussian as eps); the
student then learns from the 8 conjugates, which differ from one another by the teacher's
equivariance gap. ``evaluate.equivariance`` measures it: for PSNR-oriented teachers (the MTKD
kind) it is far below their error (SRMDNF x4: gap ~43 dB against 29 dB to gt). It is refused for
latent caches (``TeacherCache.image_space``): a latent of T(image) is not T(latent) for a VAE
(SeeSR's SD-2 f8), and a recipe that regenerates the teacher's noise from the cached seeds would
pair it with an untransformed z_T.
"""

from __future__ import annotations

import itertools
import random

import torch

from distsr.data.config import AugmentConfig

Element = tuple[bool, bool, bool]  # (hflip, vflip, transpose)
ELEMENTS: tuple[Element, ...] = tuple(itertools.product((False, True), repeat=3))


def draw(cfg: AugmentConfig, seed: int) -> Element:
    """The element of the sample with augmentation seed ``seed``; three draws always, so
    turning one option off leaves the other's draws as they were."""
    rng = random.Random(seed)
    h, v, t = (rng.random() < 0.5 for _ in range(3))
    return (h and cfg.hflip, v and cfg.rot90, t and cfg.rot90)


def transform(x: torch.Tensor, element: Element) -> torch.Tensor:
    """``x [..., H, W]`` under ``element`` (hflip, then vflip, then transpose), contiguous."""
    hflip, vflip, transpose = element
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-2, -1)
    return x.contiguous()


def augment_sample(sample: dict, element: Element) -> dict:
    """``sample``'s ``lq``, ``gt`` and spatial ``cache`` fields under ``element``, in place."""
    if element[2] and sample["lq"].shape[-1] != sample["lq"].shape[-2]:
        h, w = sample["lq"].shape[-2:]
        raise ValueError(
            f"data.augment.rot90 transposes, so it needs square crops; sample "
            f"{sample['__key__']} has lq {w}x{h}: crop square or set rot90=false"
        )
    for name in ("lq", "gt"):
        sample[name] = transform(sample[name], element)
    cache = sample.get("cache")
    if cache is not None:
        for name, value in cache.items():
            if value.ndim >= 3:  # [..., C, H, W]; not the noise seeds [K]
                cache[name] = transform(value, element)
    return sample
