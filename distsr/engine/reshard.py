"""Resume a ZeRO checkpoint at another world size through DeepSpeed's universal checkpoint.

At ZeRO 1-3 each rank saves only its partition of the fp32 master weights and Adam moments
(``*_optim_states.pt``, one per rank, flat and padded to the world size), so a checkpoint loads
only at the world size that wrote it. ``to_universal`` converts one engine's checkpoint with
DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal.main``, in this process, one
worker) into its universal layout: whole per-parameter tensors ``zero/<name>/{fp32, exp_avg,
exp_avg_sq, step}.pt``, the optimizer's param groups, and a copy of the model-state files (LR
scheduler, ``global_steps``). ``load_universal`` loads that copy into an engine of any world
size: DeepSpeed's ``load_checkpoint`` reads the universal layout when the engine's config says
``checkpoint.load_universal``; the engines are built before the checkpoint is known, so the flag
is set on the engine's parsed config for this one load and restored after. DeepSpeed reads it
only through ``engine.load_universal_checkpoint()`` at load time (``runtime/engine.py``
``load_checkpoint`` / ``_load_checkpoint`` / ``_load_zero_checkpoint``); the ZeRO optimizers
build the fragment mappings the loader needs whatever the flag (``stage_1_and_2.py``
``_link_all_hp_params``, ``bf16_optimizer.py`` ``_enable_universal_checkpoint``; ZeRO-3 maps by
parameter name). Numbers are moved, never rounded: weights, moments and step counts come back bit
for bit, and bf16 weights are re-rounded from the exact fp32 masters, as after every step.

Limits: the converter needs a save with an optimizer state (ZeRO 1-3; ZeRO-0 checkpoints are not
partitioned and load as they are at any world size); the load must use the ZeRO stage of the
save (untried across stages); the checkpoint folder must hold every saved rank's files, and each
rank's scratch copy holds the whole fp32 weights and moments (3x the model's fp32 size). The
universal load restores only the optimizer's parameters, not the module's state dict
(``engine.py`` ``_load_checkpoint``: ``if not self.load_universal_checkpoint():
self.load_module_state_dict(...)``), so buffers and frozen parameters are copied here from rank
0's saved module state, as a same-size load does (ZeRO 1-2 keep one model-state file, written by
rank 0; ZeRO-3's frozen parameters are put together from every rank's fragment). Buffers that
differ between ranks (statistics of each rank's data) come back as rank 0's on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES


def to_universal(folder: Path, out: Path) -> Path:
    """Convert the ZeRO checkpoint ``folder`` (``<engine>/<tag>``) into DeepSpeed's universal
    layout in ``out/<tag>`` (``out`` is private scratch space) and return that folder."""
    target = out / folder.name
    args = argparse.Namespace(
        input_folder=str(folder), output_folder=str(target), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        # distsr saves no universal_checkpoint_info (a Megatron-style client's tensor/pipeline
        # split patterns); at tensor and pipeline degree 1 there is none to give: the empty one
        inject_missing_state=True,
    )  # fmt: skip
    quiet = io.StringIO()  # its prints and progress bars
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(args)
    return target


def load_universal(engine, universal: Path, source: Path) -> None:
    """Load the universal copy ``universal`` (``<scratch>/<tag>``, ``to_universal``) into
    ``engine``, at its world size; buffers and frozen parameters from ``source``, the original
    checkpoint folder (``<engine>/<tag>``)."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise ValueError(f"{universal} holds no universal checkpoint")
    load_module_extras(engine, saved_module_state(source, engine))


def saved_module_state(source: Path, engine) -> dict:
    """Rank 0's saved module state dict, frozen parameters whole. ZeRO 1-2: one file, written by
    rank 0. ZeRO-3: one per rank, each with whole buffers and its partition of every frozen
    parameter (``frozen_param_fragments``), put back together here as DeepSpeed's
    ``utils/zero_to_fp32.py`` (``_zero3_merge_frozen_params``) does."""
    name = "mp_rank_00_model_states.pt"
    if not engine.zero_optimization_partition_weights():
        return _load(source / name)["module"]
    files = sorted(source.glob(f"zero_pp_rank_*_{name}"), key=lambda f: int(f.name.split("_")[3]))
    states = [_load(f) for f in files]
    module = dict(states[0]["module"])
    for key, shape in (states[0].get(FROZEN_PARAM_SHAPES) or {}).items():
        whole = torch.cat([state[FROZEN_PARAM_FRAGMENTS][key] for state in states])
        module[key] = whole[: shape.numel()].view(shape)
    return module


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@torch.no_grad()
def load_module_extras(engine, state: dict) -> None:
    """Copy the buffers and frozen parameters of ``state`` into ``engine.module``: what the
    optimizer does not hold and the universal load leaves alone."""
    module = engine.module
    for name, buffer in module.named_buffers():
        if name in state:
            buffer.copy_(state[name])
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad and n in state}
    if not frozen:
        return
    enabled = engine.zero_optimization_partition_weights()
    with deepspeed.zero.GatheredParameters(list(frozen.values()), modifier_rank=0, enabled=enabled):
        for name, p in frozen.items():
            p.copy_(state[name].view_as(p))
