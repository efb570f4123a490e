"""Hinge adversarial losses of TAD-SR's multi-head discriminator (paper 002 Eq. 11-12,
METHODS.md §2).

Every function takes the per-scale logits of ``TimeAwareDiscriminator`` (a list, one tensor
[B, ...] per head k) and reduces them as the paper writes them:

    L_D   = E[ sum_k relu(1 + D_k(fake)) ] + E[ sum_k relu(1 - D_k(real)) ]      (Eq. 12)
    L_G   = - E[ sum_k D_k(fake) ]                                               (Eq. 11)

E is the mean over the batch and over each head's logits (tokens). ``heads`` picks how the K
heads are combined:

* ``"sum"``: the sum over heads of Eq. 11-12;
* ``"mean"``: the mean of the heads' means (= sum / K), how the paper's text after Eq. 10
  describes the output (an average over the heads);
* ``"concat_mean"``: the official code (LearningHx/TAD-SR ``training_losses_D`` and the GAN
  term of ``training_losses_distill``): all heads' logits concatenated and one mean taken, so
  each head weighs by its share of all logits (at 256^2 crops the first head holds 1024 of the
  1472 tokens) and the total is about 1/K of the sum.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["d_hinge_loss", "d_hinge_terms", "g_adv_loss"]

HeadReduction = Literal["sum", "mean", "concat_mean"]


def _check(logits: list[torch.Tensor], name: str) -> None:
    if isinstance(logits, torch.Tensor) or not len(logits):
        raise ValueError(f"{name} must be a non-empty list of per-head logits [B, ...]")
    batches = {x.shape[0] if x.ndim else None for x in logits}
    if len(batches) != 1 or None in batches:
        shapes = [tuple(x.shape) for x in logits]
        raise ValueError(f"{name}: every head needs the same batch dimension, got {shapes}")


def _reduce(terms: list[torch.Tensor], heads: HeadReduction) -> torch.Tensor:
    if heads in ("sum", "mean"):
        per_head = torch.stack([x.float().mean() for x in terms])
        return per_head.sum() if heads == "sum" else per_head.mean()
    if heads == "concat_mean":
        return torch.cat([x.float().flatten(1) for x in terms], dim=1).mean()
    raise ValueError(f"heads must be 'sum', 'mean' or 'concat_mean', got {heads!r}")


def d_hinge_terms(
    logits_fake: list[torch.Tensor],
    logits_real: list[torch.Tensor],
    heads: HeadReduction = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[sum_k relu(1 + D_k(fake))], E[sum_k relu(1 - D_k(real))]), for logging each side."""
    _check(logits_fake, "logits_fake")
    _check(logits_real, "logits_real")
    if len(logits_fake) != len(logits_real):
        raise ValueError(
            f"logits_fake has {len(logits_fake)} heads but logits_real has {len(logits_real)}"
        )
    loss_fake = _reduce([F.relu(1 + x) for x in logits_fake], heads)
    loss_real = _reduce([F.relu(1 - x) for x in logits_real], heads)
    return loss_fake, loss_real


def d_hinge_loss(
    logits_fake: list[torch.Tensor],
    logits_real: list[torch.Tensor],
    heads: HeadReduction = "sum",
) -> torch.Tensor:
    """Discriminator hinge loss, paper Eq. 12 (pass fake logits computed from detached
    student outputs)."""
    loss_fake, loss_real = d_hinge_terms(logits_fake, logits_real, heads)
    return loss_fake + loss_real


def g_adv_loss(logits_fake: list[torch.Tensor], heads: HeadReduction = "sum") -> torch.Tensor:
    """Generator adversarial loss -E[sum_k D_k(fake)], paper Eq. 11."""
    _check(logits_fake, "logits_fake")
    return -_reduce(list(logits_fake), heads)
