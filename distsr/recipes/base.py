"""The Recipe interface: what one training step computes, in plain PyTorch.

A recipe builds its models, names the trainable ones (each becomes a DeepSpeed engine), and
yields ``Update``s from ``training_step``. The engine owns backward, accumulation, clipping and
the optimizer steps, and it applies each update before the recipe computes the next one, so a
recipe states the order of updates (e.g. discriminator before generator) by yielding in order.
A recipe computes in float32 and never casts: each engine's module takes float32 and returns
float32 whatever ``engine.precision`` it computes in (``engine/precision.py``), and a teacher
does the same for its own networks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Update:
    """One optimizer update: backpropagate ``loss`` into the engine named ``engine``.

    ``guards``: tensors that must be finite too for the update to apply, e.g. what a later
    update of the same micro-batch is computed from (TAD-SR: the student's output and the
    teacher's target guard the discriminator update, so a micro-batch whose student loss will be
    NaN leaves the discriminator as it was)."""

    engine: str
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    guards: tuple[torch.Tensor, ...] = ()

    def finite(self) -> bool:
        """Whether the loss and every guard are finite (on this rank)."""
        return all(bool(torch.isfinite(x.detach()).all()) for x in (self.loss, *self.guards))


class Recipe:
    """Subclasses set ``Config`` (a dataclass) and implement ``trainable`` and ``training_step``."""

    Config: type
    cached_outputs: tuple[str, ...] = ()  # teacher outputs this recipe reads from the cache

    def __init__(self, cfg, *, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.nets: dict[str, Callable] = {}

    @classmethod
    def student_spec(cls, cfg):
        """The spec of the network this recipe exports (inference and export build it)."""
        raise ValueError(f"recipe {cls.__name__} exports no network that inference can load")

    def trainable(self) -> dict[str, nn.Module]:
        """Modules to wrap in DeepSpeed engines, in a stable order."""
        raise NotImplementedError

    def partitioned(self) -> dict[str, nn.Module]:
        """Frozen modules to partition with ZeRO-3 across the ranks instead of replicating them
        (the engine wraps them before training; they keep working as plain modules)."""
        return {}

    def ema_targets(self) -> list[str]:
        """Names of trainable modules whose weights get an EMA copy (when the engine has one)."""
        return []

    def optimizer_overrides(self) -> dict[str, dict]:
        """Per-engine changes of the optimizer config, e.g. ``{"disc": {"lr": 1e-4}}``."""
        return {}

    def bind(self, engines: dict[str, Callable]) -> None:
        """Receive the engine-wrapped modules; ``training_step`` calls these."""
        self.nets.update(engines)

    def training_step(self, batch: dict, step: int) -> Iterator[Update]:
        raise NotImplementedError

    def plain(self, name: str) -> nn.Module:
        """The module behind engine ``name``, for forwards whose loss another engine owns (e.g.
        the frozen discriminator in the generator step): an engine's own forward registers
        backward hooks that would treat that loss as its own."""
        net = self.nets[name]
        return getattr(net, "module", net)

    def make_loader(self, data_cfg, **kwargs):
        """The training stream (kwargs: rank, world_size, steps, seed, start_step, state: the
        saved stream position or None); a ``state_dict()`` on it is saved with checkpoints."""
        from distsr.data.reader import make_train_loader

        return make_train_loader(data_cfg, **kwargs)

    def preview(self, batch: dict) -> dict[str, torch.Tensor]:
        """Columns of a sample-image grid (name -> [B, 3, H, W] in [0, 1], same size); every rank
        calls it (forwards may be collective), rank 0 writes it. Empty: no previews."""
        return {}

    def state_dict(self) -> dict:
        """Recipe state outside the engines (saved in the checkpoint's client state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Freeze parameters for a forward/backward whose gradients must not reach them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
