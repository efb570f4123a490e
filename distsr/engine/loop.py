"""The per-worker training loop: the same code under Ray Train, torchrun or in-process."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from distsr.config import from_dict
from distsr.data.reader import make_train_loader
from distsr.engine.build import build_engine
from distsr.engine.checkpoint import load_state, save_state
from distsr.engine.context import DistContext
from distsr.engine.ema import EMA
from distsr.engine.export import export_weights
from distsr.engine.metrics import MetricLogger
from distsr.registry import get_recipe
from distsr.runconfig import RunConfig, method_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the recipe, its engines and the counters; ``run`` trains to ``max_steps``."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, store):
        self.cfg, self.ctx, self.store = cfg, ctx, store
        seed_everything(cfg.seed + 1000 * ctx.rank)
        dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        self.recipe = get_recipe(cfg.recipe)(method_config(cfg), device=ctx.device, dtype=dtype)
        self.engines = {
            name: build_engine(module, cfg.engine, cfg.data.batch_size, ctx)
            for name, module in self.recipe.trainable().items()
        }
        self.recipe.bind(self.engines)
        decay = cfg.engine.ema_decay
        self.emas = (
            {n: EMA(self.engines[n], decay) for n in self.recipe.ema_targets()} if decay else {}
        )
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0

    # -- checkpoints -------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped_samples": self.skipped,
            "recipe": self.recipe.state_dict(),
            "ema": {n: e.state_dict() for n, e in self.emas.items()},
        }

    def restore(self) -> None:
        with self.store.latest() as folder:
            if folder is None:
                return
            state = load_state(folder, self.engines, self.ctx)
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.skipped = state.get("skipped_samples", 0)
        self.recipe.load_state_dict(state["recipe"])
        for name, ema_state in state["ema"].items():
            self.emas[name].load_state_dict(ema_state)
        if self.ctx.is_main:
            print(f"[distsr] resumed from {folder} at step {self.step}", flush=True)

    def checkpoint(self, metrics: dict) -> None:
        state = self.client_state()
        self.store.save(
            self.step, lambda folder: save_state(folder, self.engines, state, self.ctx), metrics
        )

    # -- training ----------------------------------------------------------------------------
    def maybe_inject_failure(self) -> None:
        dbg = self.cfg.debug
        if dbg.fail_at_step != self.step or dbg.fail_rank != self.ctx.rank:
            return
        marker = self.cfg.run_dir / f".injected_failure_step{self.step}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("injected\n")
            print(f"[distsr] injected failure at step {self.step} on rank {self.ctx.rank}")
            os._exit(17)

    def micro_step(self, batch: dict) -> None:
        for update in self.recipe.training_step(batch, self.step):
            engine = self.engines[update.engine]
            engine.backward(update.loss)
            engine.step()
            self.logger.accumulate({f"loss/{update.engine}": update.loss.item(), **update.logs})

    def run(self) -> dict:
        cfg = self.cfg
        self.restore()
        accum = cfg.engine.grad_accum
        micro_steps = (cfg.engine.max_steps - self.step) * accum
        self.logger = MetricLogger(
            cfg.run_dir,
            enabled=self.ctx.is_main,
            tensorboard=cfg.engine.tensorboard,
            max_steps=cfg.engine.max_steps,
        )
        last = {"step": self.step}
        if micro_steps <= 0:
            return last
        loader = make_train_loader(
            cfg.data,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            steps=micro_steps,
            seed=cfg.seed,
            start_step=self.step,
        )
        for i, batch in enumerate(loader):
            self.skipped += int(batch.pop("skipped", 0))
            self.micro_step(batch)
            if (i + 1) % accum:
                continue
            self.step += 1
            batch_samples = cfg.data.batch_size * accum * self.ctx.world_size
            self.samples_seen += batch_samples
            self.logger.step_done(batch_samples)
            for name, ema in self.emas.items():
                ema.update(self.engines[name])
            self.maybe_inject_failure()
            if self.step % cfg.engine.log_every == 0 or self.step == cfg.engine.max_steps:
                lr = self.engines[next(iter(self.engines))].get_lr()[0]
                last = self.logger.flush(self.step, {"lr": lr, "skipped_samples": self.skipped})
            if (
                self.step % cfg.engine.checkpoint.every_steps == 0
                or self.step == cfg.engine.max_steps
            ):
                self.checkpoint(last)
        self.logger.close()
        export_weights(self.cfg.run_dir, self.engines, self.emas, self.ctx.is_main)
        return last


def train_worker(cfg_dict: dict, ctx: DistContext, store) -> dict:
    """Entry point of one worker: build everything from the plain-dict config and train."""
    cfg = from_dict(RunConfig, cfg_dict, source="run config")
    return Trainer(cfg, ctx, store).run()
