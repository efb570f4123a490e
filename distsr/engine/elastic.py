"""The global batch of an elastic run (``scaling.num_workers: [min, max]``) at any world size.

The configured global batch is the one of ``max`` workers: ``B = data.batch_size *
engine.grad_accum * max``. At ``w`` workers the gradient accumulation becomes
``ceil(grad_accum * max / w)``; when that product is not ``grad_accum * max`` exactly (``w`` does
not divide it), the batch grows to the next multiple and every engine's learning rate is scaled
by ``actual / B``, the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
Both are logged with every step (``world_size``, ``grad_accum``, ``global_batch``, ``lr_scale``).
A fixed-size run (an int ``num_workers``) keeps its configured accumulation and scale 1.
"""

from __future__ import annotations

import dataclasses
import math

from distsr.engine.config import EngineConfig, ScalingConfig


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    world_size: int
    grad_accum: int
    global_batch: int  # samples per optimizer step at this world size
    target: int  # the configured global batch (at max workers)

    @property
    def lr_scale(self) -> float:
        return self.global_batch / self.target

    def logs(self) -> dict:
        return {"world_size": self.world_size, "grad_accum": self.grad_accum,
                "global_batch": self.global_batch, "lr_scale": self.lr_scale}  # fmt: skip


def batch_plan(engine: EngineConfig, micro_batch: int, scaling: ScalingConfig,
               world_size: int) -> BatchPlan:  # fmt: skip
    if not scaling.elastic:  # a fixed size: the configured accumulation at any world size
        accum = engine.grad_accum
        return BatchPlan(world_size, accum, micro_batch * accum * world_size,
                         micro_batch * accum * world_size)  # fmt: skip
    if not scaling.min_workers <= world_size <= scaling.max_workers:
        raise ValueError(f"world size {world_size} is outside scaling.num_workers "
                         f"{scaling.num_workers}")  # fmt: skip
    per_rank = engine.grad_accum * scaling.max_workers  # micro-batches of one rank at size 1
    accum = math.ceil(per_rank / world_size)
    return BatchPlan(world_size, accum, micro_batch * accum * world_size, micro_batch * per_rank)
