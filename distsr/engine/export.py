"""Model-only export at the end of training: ``run_dir/export/<engine>.safetensors`` (and
``<engine>_ema.safetensors``) with the module's own parameter names, so that inference, evaluation
and the official-format converters read plain weights without DeepSpeed. Both are complete state
dicts: the EMA file holds the averages of the trainable parameters (the only ones ``EMA`` keeps)
and the module's own frozen parameters and buffers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from distsr.engine.build import gathered


def full_state_dict(engine, ema=None) -> dict[str, torch.Tensor]:
    """Collective under ZeRO-3 (parameters gathered); the EMA's averages, if given, replace the
    trainable parameters (frozen ones and buffers stay the module's)."""
    with gathered(engine):
        state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                 for k, v in engine.module.state_dict().items()}  # fmt: skip
    if ema is not None:
        unknown = [k for k in ema.shadow if k not in state]
        if unknown:
            raise ValueError(f"EMA entries not in the module's state dict: {unknown[:5]}")
        state.update({k: v.cpu().clone() for k, v in ema.shadow.items()})
    return state


def export_weights(run_dir: Path, engines: dict, emas: dict, is_main: bool) -> list[Path]:
    out_dir = Path(run_dir) / "export"
    written = []
    for name, engine in engines.items():
        variants = {name: None, **({f"{name}_ema": emas[name]} if name in emas else {})}
        for file_name, ema in variants.items():
            state = full_state_dict(engine, ema)
            if is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"{file_name}.safetensors"
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
                tmp.replace(path)
                written.append(path)
    return written
