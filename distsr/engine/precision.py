"""The one precision rule of the engines (plain PyTorch; ``build.py`` applies it).

An engine computes in one dtype, ``compute_dtype(precision)``: its module's parameters and float
buffers are cast to it before DeepSpeed wraps the module (DeepSpeed >= 0.17 casts parameters
only, which leaves e.g. spectral norm's power-iteration vectors in float32 beside bf16 weights).
``computes_in`` makes the module's boundary the only place where dtypes change: floating inputs
are cast to the compute dtype on entry and floating outputs back to float32 on exit, for
``forward`` and for the methods a module names in ``entry_points`` (e.g. FKdiff's prior
``sample``, which a preview calls on the engine's module). Recipes and
losses therefore see float32 everywhere (losses, the HSD weight, the discriminator's logits) and
never cast; gradients flow through both casts. A frozen engine (a ZeRO-3 teacher) computes in
the dtype its teacher was built in (``teacher.dtype``). Teachers follow the same contract for the
networks they hold themselves: float32 in and out, their own dtype inside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype an engine of ``engine.precision`` computes in."""
    return DTYPES[precision]


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s floating parameters (float32 for a module without any)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        found = sorted(map(str, dtypes))
        raise ValueError(f"{type(module).__name__} mixes parameter dtypes {found}")
    return dtypes.pop() if dtypes else torch.float32


def computes_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module`` (parameters and float buffers) to ``dtype`` and hook its boundary: floating
    tensors among its inputs (also inside tuples, lists and dicts) enter in ``dtype``, floating
    outputs leave as float32. Integer tensors (timesteps) pass unchanged."""
    module.to(dtype)
    if dtype == torch.float32:
        return module  # nothing to cast: inputs and outputs are float32 already

    def enter(_m, args, kwargs):
        return map_tensors(args, lambda x: _cast(x, dtype)), map_tensors(
            kwargs, lambda x: _cast(x, dtype)
        )

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(lambda _m, _args, out: map_tensors(out, _to_float32))
    for name in getattr(module, "entry_points", ()):  # methods called from outside besides forward
        setattr(module, name, _at_boundary(getattr(module, name), dtype))
    return module


def _at_boundary(method: Callable, dtype: torch.dtype) -> Callable:
    """``method`` with the boundary rule of ``computes_in``: floating inputs in ``dtype``,
    floating outputs float32."""

    def call(*args, **kwargs):
        args, kwargs = map_tensors((args, kwargs), lambda x: _cast(x, dtype))
        return map_tensors(method(*args, **kwargs), _to_float32)

    return call


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def _to_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() else x


def map_tensors(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``value`` with ``fn`` applied to every tensor in it (nested tuples, lists, dicts)."""
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return fn(value) if torch.is_tensor(value) else value
