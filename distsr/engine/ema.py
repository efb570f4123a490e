"""Exponential moving average of an engine's weights, kept in fp32 on every rank."""

from __future__ import annotations

import torch

from distsr.engine.build import gathered


class EMA:
    def __init__(self, engine, decay: float):
        self.decay = decay
        with gathered(engine):
            self.shadow = {
                n: p.detach().float().clone() for n, p in engine.module.named_parameters()
            }

    @torch.no_grad()
    def update(self, engine) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (ZeRO-3 weights gathered first)."""
        with gathered(engine):
            for name, p in engine.module.named_parameters():
                self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}
