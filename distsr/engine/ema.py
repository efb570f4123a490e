"""Exponential moving average of an engine's trainable weights, kept in fp32 on every rank.

Only parameters with ``requires_grad`` get a shadow: a frozen weight never changes, so its
average is the weight itself, and the export (``engine/export.py``) takes it from the module.
Under ZeRO-3 the flag stays on the partitioned parameter (DeepSpeed partitions the data into
``param.ds_tensor``, whose own flag is always off), so every rank keeps the same names, and only
those parameters are gathered. The set is fixed when the EMA is built (before training, outside
any ``recipes.base.frozen``). The released TAD-SeeSR student (``configs/tadsr_seesr.yaml``: the
SeeSR UNet + ControlNet, SD-2-base layout, training ``image_attentions`` and
``controlnet_cond_embedding``) has 1,615,791,764 parameters, 386,739,280 trainable (76.1 %
frozen): its shadow is 1.55 GB (1.44 GiB) of fp32 per rank instead of 6.46 GB (6.02 GiB).

A saved state whose shadow also holds frozen parameters (checkpoints written before this rule)
loads: those entries are dropped (the old shadow of a never-trained weight equals the weight).
"""

from __future__ import annotations

import torch

from distsr.engine.build import gathered


def trainable_parameters(engine) -> dict[str, torch.nn.Parameter]:
    """The parameters of the engine's module that train (``requires_grad``), by name."""
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


class EMA:
    def __init__(self, engine, decay: float):
        self.decay = decay
        params = trainable_parameters(engine)
        with gathered(engine, params.values()):
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, engine) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, for the trainable weights (ZeRO-3:
        gathered first)."""
        named = dict(engine.module.named_parameters())
        params = [named[n] for n in self.shadow]
        with gathered(engine, params):
            for avg, p in zip(self.shadow.values(), params):
                avg.lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved EMA; entries of parameters that do not train are dropped, a trainable
        parameter without an entry is an error."""
        saved = state["shadow"]
        missing = [n for n in self.shadow if n not in saved]
        if missing:
            raise ValueError(
                f"the saved EMA has no average of {len(missing)} trainable parameters "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): it was saved "
                "for another set of trainable parameters"
            )
        self.decay = state["decay"]
        self.shadow = {n: saved[n].to(avg.device, torch.float32) for n, avg in self.shadow.items()}
