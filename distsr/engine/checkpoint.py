"""Checkpoints with everything needed to resume: engines (DeepSpeed, with optimizer and LR
state), step, samples seen, recipe and EMA state, and each rank's RNG states.

A store decides where checkpoints live: ``LocalStore`` (in-process runs) renames a finished
temp folder into place, so a half-written checkpoint is never visible; the Ray store (in
``ray_adapter``) hands each rank's folder to Ray Train, which registers it once all ranks are
uploaded.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from distsr.engine.context import DistContext

TAG = "state"
CLIENT_STATE = "client_state.pt"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: Path, engines: dict, client_state: dict, ctx: DistContext) -> None:
    """Collective: every rank calls it with its own ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag=TAG)
    torch.save(rng_state(), folder / f"rng_rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save(client_state, folder / CLIENT_STATE)


def load_state(folder: Path, engines: dict, ctx: DistContext) -> dict:
    """Collective: load every engine from ``folder`` and return the client state. A ZeRO 1-3
    checkpoint saved at another world size is resharded (``reshard_engine``)."""
    if not (folder / CLIENT_STATE).is_file():
        raise ValueError(f"{folder} is not a distsr checkpoint (no {CLIENT_STATE})")
    client_state = torch.load(folder / CLIENT_STATE, weights_only=False)
    for name, engine in engines.items():
        saved = folder / name / TAG
        world = client_state.get("world_size") or saved_world_size(saved)
        if engine.zero_optimization_stage() > 0 and world not in (0, ctx.world_size):
            reshard_engine(engine, saved)
            continue
        path, _ = engine.load_checkpoint(str(folder / name), tag=TAG)
        if path is None:
            raise ValueError(f"checkpoint {folder} has no state for engine {name!r}")
    rng_file = folder / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def saved_world_size(saved: Path) -> int:
    """How many ranks wrote the engine checkpoint ``saved`` (``<engine>/<tag>``): DeepSpeed writes
    one optimizer partition per rank at ZeRO 1-3, none at ZeRO-0 (0: not partitioned)."""
    return len(list(saved.glob("*_optim_states.pt")))


def reshard_engine(engine, saved: Path) -> None:
    """Load the ZeRO checkpoint ``saved`` (``<engine>/<tag>``), written at another world size,
    through DeepSpeed's universal format: each rank converts it on its own, into a private temp
    folder (ranks may not share a filesystem), removed after."""
    if not saved.is_dir():
        raise ValueError(f"checkpoint has no engine state at {saved}")
    from distsr.engine import reshard  # imports deepspeed: not at the Ray driver's import

    with tempfile.TemporaryDirectory(prefix="distsr-reshard-") as scratch:
        universal = reshard.to_universal(saved, Path(scratch))
        reshard.load_universal(engine, universal, saved)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class LocalStore:
    """Checkpoints under ``run_dir/checkpoints/step_NNNNNNNN``; the newest ``keep`` are kept."""

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / CLIENT_STATE).is_file()]
        return sorted(found)

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = self.complete()
        yield found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> Path:
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
