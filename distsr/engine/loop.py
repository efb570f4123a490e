"""The per-worker training loop: the same code under Ray Train, torchrun or in-process.

A run folder on object storage (``output_dir: s3://...``) is worked on in a local temp copy
(``RunConfig.run_dir``): rank 0 pulls it before resuming and pushes it after every checkpoint
and at the end (``data.storage.Mirror``; a checkpoint's ``client_state.pt`` goes last, so a
push cut short leaves no folder that looks complete), then removes the copy."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from distsr.data import storage
from distsr.data.regroup import regrouped
from distsr.engine.build import build_engine, build_frozen_engine
from distsr.engine.checkpoint import CLIENT_STATE, load_state, save_state, step_name
from distsr.engine.context import DistContext
from distsr.engine.elastic import batch_plan
from distsr.engine.ema import EMA
from distsr.engine.export import export_weights
from distsr.engine.metrics import MetricLogger
from distsr.engine.schedule import refresh_lr
from distsr.engine.status import RunStatus
from distsr.registry import get_recipe
from distsr.runconfig import RunConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Holds the recipe, its engines and the counters; ``run`` trains to ``max_steps``."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, store):
        self.cfg, self.ctx, self.store = cfg, ctx, store
        seed_everything(cfg.seed + 1000 * ctx.rank)
        self.recipe = get_recipe(cfg.recipe)(cfg.method, device=ctx.device)
        overrides = self.recipe.optimizer_overrides()
        # the global batch at this world size (elastic runs: engine/elastic.py)
        self.batch = batch_plan(cfg.engine, cfg.data.batch_size, cfg.scaling, ctx.world_size)
        engine_cfg = dataclasses.replace(cfg.engine, grad_accum=self.batch.grad_accum)
        micro, scale = cfg.data.batch_size, self.batch.lr_scale
        self.engines = {
            name: build_engine(module, engine_cfg, micro, ctx, overrides.get(name), scale)
            for name, module in self.recipe.trainable().items()
        }
        self.frozen_engines = {  # ZeRO-3 partitioned frozen modules (e.g. a large teacher)
            name: build_frozen_engine(module, cfg.data.batch_size, ctx, cfg.engine)
            for name, module in self.recipe.partitioned().items()
        }
        self.recipe.bind(self.engines)
        decay = cfg.engine.ema_decay
        self.emas = (
            {n: EMA(self.engines[n], decay) for n in self.recipe.ema_targets()} if decay else {}
        )
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.nonfinite = 0
        self.nonfinite_in_row = 0
        self.injected_nonfinite: dict[int, int] = {}
        self.preempted = False  # a preemption notice was answered with a checkpoint
        self.loader = None  # the training stream (its position is saved with each checkpoint)
        self.data_state: dict | None = None  # this rank's saved stream position, on resume
        self.mirror = None  # rank 0's link from the local run folder to object storage
        if storage.is_remote(cfg.run_url) and ctx.is_main:
            # Ray Train's step_* folders are Ray's to download (it keeps them in storage_path)
            self.mirror = storage.Mirror(cfg.run_dir, cfg.run_url, skip=("step_*",),
                                         last=(CLIENT_STATE,))  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "world_size": self.ctx.world_size,
            "samples_seen": self.samples_seen,
            "skipped_samples": self.skipped,
            "nonfinite_steps": self.nonfinite,
            "recipe": self.recipe.state_dict(),
            "ema": {n: e.state_dict() for n, e in self.emas.items()},
            "data": self.data_states(),
        }

    def data_states(self) -> list[dict | None]:
        """Every rank's stream position (collective: rank 0 writes the client state)."""
        saver = getattr(self.loader, "state_dict", None)  # a recipe's own stream may have none
        mine = saver() if saver is not None else None
        if self.ctx.world_size == 1:
            return [mine]
        states = [None] * self.ctx.world_size
        dist.all_gather_object(states, mine)
        return states

    def restore(self) -> None:
        with self.store.latest() as folder:
            if folder is None:
                return
            state = load_state(folder, self.engines, self.ctx)
        for engine in self.engines.values():  # the lr of this world size (engine/elastic.py)
            refresh_lr(engine.lr_scheduler)
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.skipped = state.get("skipped_samples", 0)
        self.nonfinite = state.get("nonfinite_steps", 0)
        self.recipe.load_state_dict(state["recipe"])
        for name, ema_state in state["ema"].items():
            self.emas[name].load_state_dict(ema_state)
        # this rank's stream, or (another world size) fresh streams after every consumed sample
        self.data_state = regrouped(state.get("data") or [], self.ctx.rank, self.ctx.world_size)
        if self.ctx.is_main:
            saved = state.get("world_size", self.ctx.world_size)
            resized = f" (saved at world size {saved})" if saved != self.ctx.world_size else ""
            print(f"[distsr] resumed from {folder} at step {self.step} on "
                  f"{self.ctx.world_size} workers{resized}", flush=True)  # fmt: skip

    def checkpoint(self, metrics: dict) -> None:
        state = self.client_state()

        def write(folder):
            save_state(folder, self.engines, state, self.ctx)
            self.maybe_inject_failure("checkpoint")

        self.store.save(self.step, write, metrics)
        self.sync()

    def sync(self, finished: bool = False) -> None:
        """Push the local run folder to object storage (rank 0, remote run folders only); at
        the end, remove the local copy."""
        if self.mirror is None:
            return
        self.mirror.push()
        if finished:
            shutil.rmtree(self.cfg.run_dir.parent, ignore_errors=True)

    # -- training ----------------------------------------------------------------------------
    def maybe_inject_failure(self, where: str) -> None:
        """Test hook: die once at ``debug.fail_at_step``, after the step or inside its checkpoint
        (engine files written, checkpoint not yet registered)."""
        dbg = self.cfg.debug
        wanted = "checkpoint" if dbg.fail_in_checkpoint else "step"
        if where != wanted or dbg.fail_at_step != self.step or dbg.fail_rank != self.ctx.rank:
            return
        marker = storage.join(self.cfg.run_url, f".injected_failure_step{self.step}")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, b"injected\n")
        print(f"[distsr] injected failure ({dbg.fail_mode}, {where}) at step {self.step} "
              f"on rank {self.ctx.rank}", flush=True)  # fmt: skip
        if dbg.fail_mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(17)

    def all_finite(self, update) -> bool:
        """True when the update's loss and guards are finite on EVERY rank (flag all-reduced,
        so all ranks agree)."""
        dbg = self.cfg.debug
        finite = update.finite()
        if self.step in dbg.nonfinite_at_steps and self.ctx.rank == dbg.nonfinite_rank:
            injected = self.injected_nonfinite.get(self.step, 0)
            if injected < dbg.nonfinite_repeat:
                self.injected_nonfinite[self.step] = injected + 1
                finite = False
        flag = torch.tensor([float(finite)], device=update.loss.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def maybe_preview(self, batch: dict) -> None:
        """Before the step's checkpoint: a preview may draw from the RNG the checkpoint saves."""
        every = self.cfg.engine.preview_every
        if every and self.step % every == 0:
            self.logger.image_grid(self.step, self.recipe.preview(batch))

    def micro_step(self, batch: dict) -> bool:
        """Apply the recipe's updates in order; False (nothing more applied) on a NaN/inf loss."""
        for update in self.recipe.training_step(batch, self.step):
            if not self.all_finite(update):
                return False
            engine = self.engines[update.engine]
            engine.backward(update.loss)
            engine.step()
            logs = {f"loss/{update.engine}": update.loss.item(), **update.logs}
            norm = engine.get_global_grad_norm()
            if norm is not None:
                logs[f"grad_norm/{update.engine}"] = float(norm)
            self.logger.accumulate(logs)
        return True

    def skip_nonfinite(self) -> None:
        self.nonfinite += 1
        self.nonfinite_in_row += 1
        limit = self.cfg.engine.max_nonfinite_in_row
        if self.ctx.is_main:
            print(f"[distsr] non-finite loss at step {self.step}: skipped on all ranks "
                  f"({self.nonfinite_in_row} in a row, limit {limit})", flush=True)  # fmt: skip
        if self.nonfinite_in_row >= limit:
            self.status.update(state="failed", nonfinite_steps=self.nonfinite)
            raise RuntimeError(
                f"loss was NaN/inf on {self.nonfinite_in_row} micro-batches in a row at step "
                f"{self.step}; stopping (engine.max_nonfinite_in_row={limit}). Lower the learning "
                "rate, enable grad_clip, or check the data; the last good checkpoint is kept."
            )

    def optimizer_step_done(self, batch: dict) -> None:
        cfg = self.cfg
        self.step += 1
        batch_samples = self.batch.global_batch
        self.samples_seen += batch_samples
        self.logger.step_done(batch_samples)
        for name, ema in self.emas.items():
            ema.update(self.engines[name])
        self.maybe_inject_failure("step")
        final = self.step == cfg.engine.max_steps
        if self.step % cfg.engine.log_every == 0 or final:
            # lr per engine; "lr" is the last engine's (the student's, after its discriminator)
            lrs = {f"lr/{name}": engine.get_lr()[0] for name, engine in self.engines.items()}
            extra = {"lr": list(lrs.values())[-1], **lrs, "skipped_samples": self.skipped,
                     "nonfinite_steps": self.nonfinite, **self.batch.logs()}  # fmt: skip
            self.last = self.logger.flush(self.step, extra)
            self.status.update(state="running", step=self.step, skipped_samples=self.skipped,
                               nonfinite_steps=self.nonfinite, eta_s=self.logger.eta_s)  # fmt: skip
        self.maybe_preview(batch)
        if self.step % cfg.engine.checkpoint.every_steps == 0 or final or self.notice():
            self.checkpoint(self.last)
            self.status.update(last_checkpoint=step_name(self.step), step=self.step)

    def notice(self) -> bool:
        """True once, at the first step after a preemption notice for a node of this run
        (``engine.checkpoint.on_preemption``; the store asks Ray Train on every rank alike)."""
        if self.preempted or not self.cfg.engine.checkpoint.on_preemption:
            return False
        ask = getattr(self.store, "preemption", None)  # stores outside Ray Train have none
        notice = ask() if ask is not None else None
        if notice is None:
            return False
        self.preempted = True
        if self.ctx.is_main:
            print(f"[distsr] preemption notice ({notice}): checkpoint at step {self.step}",
                  flush=True)  # fmt: skip
        return True

    def make_loader(self, micro_steps: int):
        return self.recipe.make_loader(
            self.cfg.data,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            steps=micro_steps,
            seed=self.cfg.seed,
            start_step=self.step,
            state=self.data_state,
        )

    def run(self) -> dict:
        cfg = self.cfg
        if self.mirror is not None:
            self.mirror.pull()
        self.restore()
        self.last = {"step": self.step}
        self.status = RunStatus(cfg.run_dir, self.ctx.is_main, cfg.engine.max_steps)
        self.status.update(state="running", step=self.step, skipped_samples=self.skipped)
        accum = self.batch.grad_accum
        micro_steps = (cfg.engine.max_steps - self.step) * accum
        if micro_steps <= 0:  # relaunched after the end: report the run's last metrics
            self.status.update(state="finished")
            if self.ctx.is_main:
                print(f"[distsr] already finished at step {self.step}", flush=True)
            last = last_logged(cfg.run_dir, self.last)
            self.sync(finished=True)
            return last
        self.logger = MetricLogger(
            cfg.run_dir,
            enabled=self.ctx.is_main,
            tensorboard=cfg.engine.tensorboard,
            max_steps=cfg.engine.max_steps,
            resumed_at=self.step,
        )
        # spare batches for skipped non-finite micro-batches (every rank skips the same ones)
        spare = cfg.engine.max_nonfinite_in_row * accum * 4
        done_micro = 0
        self.loader = self.make_loader(micro_steps + spare)
        for batch in self.logger.timed(self.loader):
            self.skipped += int(batch.pop("skipped", 0))
            if not self.micro_step(batch):
                self.skip_nonfinite()
                continue
            self.nonfinite_in_row = 0
            done_micro += 1
            if done_micro % accum == 0:
                self.optimizer_step_done(batch)
            if self.step >= cfg.engine.max_steps:
                break
        self.logger.close()
        export_weights(cfg.run_dir, self.engines, self.emas, self.ctx.is_main)
        self.status.update(state="finished", step=self.step)
        self.sync(finished=True)
        return self.last


def last_logged(run_dir, default: dict) -> dict:
    """The last line of the run's ``metrics.jsonl`` (``default`` when there is none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else default


def train_worker(cfg: RunConfig, ctx: DistContext, store) -> dict:
    """Entry point of one worker: build everything from the driver's parsed config and train."""
    return Trainer(cfg, ctx, store).run()
