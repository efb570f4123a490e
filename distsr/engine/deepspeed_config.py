"""The DeepSpeed JSON, generated from the typed engine config."""

from __future__ import annotations

from distsr.engine.config import EngineConfig


def deepspeed_config(cfg: EngineConfig, micro_batch: int, world_size: int) -> dict:
    """DeepSpeed config for one trainable module (optimizer and scheduler are torch objects)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        # always written: DeepSpeed clips at norm 1.0 when the key is absent; 0.0 turns it off
        "gradient_clipping": float(cfg.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
