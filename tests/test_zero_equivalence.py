"""ZeRO stages 0-3 train the same first step, and a ZeRO-3-partitioned frozen teacher computes
what the replicated one does. Two ranks: a gloo group of 2 spawned processes (each rank runs
every stage in turn, so the group starts once), real DeepSpeed engines, the real shard reader.

Every stage starts from rank 0's broadcast weights, reads the same batch and draws the same
noise, so the stages may differ only by rounding. Where it comes from: ZeRO-1/2 keep the
parameters as views into one flat buffer and ZeRO-3 gathers them into fresh buffers, so the
CPU's GEMM and convolution kernels run on other memory alignments and may block their sums
differently (observed: the discriminator's loss 3 ulps apart on one rank, ResShift's bit-equal).
The tolerances, stage s against stage 0, per rank:
* losses: within LOSS_ULPS = 16 float32 ulps.
* the rank-averaged gradient each engine hands its optimizer (gathered whole):
  |g_s - g_0| <= GRAD_REL |g_0| (2-norms over all parameters), GRAD_REL = 1e-5. Last-bit
  differences of the forward pass through backward; the discriminator's spectral-norm power
  iteration and hinge amplify a few elements (observed: 7e-5 of one bias's largest entry) but
  the whole gradient moved by < 1e-6 relative (8 float32 ulps). A gradient not averaged over
  the ranks, or missing one rank's part, is off by tens of percent.
* the gradient norm each stage reports (ZeRO-1/2/3: DeepSpeed's own, stage 0: none, so it is
  summed here in float32): within NORM_ULPS = 64 ulps of the float64 norm of stage 0's
  gradient. The norm moves with the gradient (< 1e-6 relative above, about 8 ulps) and with
  the order of DeepSpeed's float32 sum of squares (flat partitions or per parameter, then the
  2-rank all-reduce): for n non-negative terms the relative error is below (n - 1) u with
  u = 2^-24, n here ~1e2 per reduction block; the square root halves it.
Within a stage both ranks hold the same averaged gradient, bit for bit: a 2-rank reduction adds
2 values (commutative, exactly rounded) and halves them (exact).
The ZeRO-3-partitioned teacher's targets (its 4-step trajectory) and the encoder features the
discriminator reads equal the replicated teacher's bit for bit: the gathered weights are exact
copies and the teacher's buffers are its own, so the same kernels run on the same shapes
(unlike the trained engines above, nothing is flattened).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from distsr.config import CONFIG_DIR, load_yaml
from distsr.models.resshift_unet import UNetModelSwin
from tests.conftest import tiny_overrides
from tests.ulps import assert_close_ulps

pytestmark = pytest.mark.slow

WORLD = 2
STAGES = (0, 1, 2, 3)
LOSS_ULPS = 16
GRAD_REL = 1e-5
NORM_ULPS = 64
RECIPES = {  # config -> its engines
    "resshift_tiny": ("unet",),
    "tadsr_tiny": ("disc", "student"),
}


class NoCheckpoints:
    """A store that keeps nothing: the comparison needs no checkpoint."""

    @contextlib.contextmanager
    def latest(self):
        yield None

    def save(self, step, write, metrics):
        return None


def run_config(config: str, stage: int, root: Path, shards: Path, teacher: Path, *extra: str):
    from distsr.runconfig import load_run_config

    overrides = [f"name={config}_zero{stage}", f"engine.zero_stage={stage}",
                 "engine.max_steps=1", "engine.preview_every=0",
                 "engine.tensorboard=false", f"scaling.num_workers={WORLD}", *extra]  # fmt: skip
    if config == "tadsr_tiny":
        overrides.append(f"method.teacher.unet_checkpoint={teacher}")
    return load_run_config(config, tiny_overrides(root, shards, *overrides))


def first_step(cfg, ctx) -> dict:
    """One optimizer step of every update, as the loop applies it (``Trainer.micro_step``), with
    each engine's rank-averaged gradients read between its backward and its step."""
    from deepspeed.utils import safe_get_full_grad

    from distsr.engine.loop import Trainer

    trainer = Trainer(cfg, ctx, NoCheckpoints())
    batch = next(iter(trainer.make_loader(1)))
    batch.pop("skipped", None)
    out = {}
    for update in trainer.recipe.training_step(batch, trainer.step):
        engine = trainer.engines[update.engine]
        engine.backward(update.loss)
        grads = {name: safe_get_full_grad(p).detach().clone()
                 for name, p in engine.module.named_parameters() if p.requires_grad}  # fmt: skip
        engine.step()
        norm = engine.get_global_grad_norm()
        out[update.engine] = {"loss": update.loss.detach().clone(), "grads": grads,
                              "norm": None if norm is None else float(norm)}  # fmt: skip
    return out


def teacher_outputs(cfg, ctx) -> dict:
    """The live teacher's targets for the first batch and the encoder features the
    discriminator reads, with the teacher replicated or partitioned (``teacher_partition``)."""
    from distsr.engine.build import build_frozen_engine
    from distsr.recipes.tadsr import TadsrRecipe

    recipe = TadsrRecipe(cfg.method, device=ctx.device)
    shards = {}
    for name, module in recipe.partitioned().items():
        build_frozen_engine(module, cfg.data.batch_size, ctx)
        # each rank holds its half of every weight; whole ones exist only inside a forward
        shards[name] = [(p.ds_tensor.numel(), p.ds_numel, p.numel()) for p in module.parameters()]
    loader = recipe.make_loader(cfg.data, rank=ctx.rank, world_size=ctx.world_size, steps=1,
                                seed=cfg.seed)  # fmt: skip
    batch = next(iter(loader))
    tgt = recipe.source.targets(batch, 0)
    gen = torch.Generator().manual_seed(7 + ctx.rank)
    z0 = tgt["z0_tch"]
    t = torch.randint(0, recipe.teacher.num_timesteps, (z0.shape[0],), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    with torch.no_grad():
        feats = recipe.features(z0, t, eps, tgt["cond"])
    return {"z0_tch": z0, "z_gt": tgt["z_gt"], "features": feats, "shards": shards}


def rank_main(rank: int, port: int, root: Path, shards: Path, teacher: Path) -> None:
    from distsr.engine.context import from_environment

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ctx = from_environment()
    results = {"steps": {}, "teacher": {}}
    for config in RECIPES:
        for stage in STAGES:
            cfg = run_config(config, stage, root, shards, teacher)
            results["steps"][config, stage] = first_step(cfg, ctx)
    for partition in ("replicate", "zero3"):
        cfg = run_config("tadsr_tiny", 2, root, shards, teacher,
                         f"method.teacher_partition={partition}")  # fmt: skip
        results["teacher"][partition] = teacher_outputs(cfg, ctx)
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_shards, tmp_path_factory) -> list[dict]:
    """Both ranks' results (spawned once for the module)."""
    from distsr.engine.context import _free_port

    root = tmp_path_factory.mktemp("zero")
    torch.manual_seed(0)
    unet = UNetModelSwin(**load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"])
    teacher = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(teacher))
    group = mp.start_processes(rank_main, args=(_free_port(), root, tiny_shards, teacher),
                               nprocs=WORLD, join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 600
    while not group.join(timeout=1):  # raises with the rank's traceback if one fails
        assert time.monotonic() < deadline, "the 2-rank group did not finish within 600 s"
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def norm64(grads: dict) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))


def distance64(a: dict, b: dict) -> float:
    return math.sqrt(sum((a[n].double() - g.double()).square().sum().item() for n, g in b.items()))


def reported_norm(step: dict) -> float:
    """DeepSpeed's norm (ZeRO-1/2/3); stage 0 reports none: summed here as float32."""
    if step["norm"] is not None:
        return step["norm"]
    return sum(g.square().sum() for g in step["grads"].values()).sqrt().item()


@pytest.mark.parametrize("config", list(RECIPES))
def test_zero_stages_compute_the_same_first_step(ranks, config):
    for rank, results in enumerate(ranks):
        for engine in RECIPES[config]:
            want = results["steps"][config, 0][engine]
            exact = torch.tensor(norm64(want["grads"]), dtype=torch.float32)
            for stage in STAGES:
                got = results["steps"][config, stage][engine]
                where = f"rank {rank}, ZeRO-{stage}, {engine}"
                assert_close_ulps(got["loss"], want["loss"], LOSS_ULPS, msg=f"{where}: loss")
                assert got["grads"].keys() == want["grads"].keys()
                moved = distance64(got["grads"], want["grads"]) / norm64(want["grads"])
                assert moved <= GRAD_REL, f"{where}: gradient moved by {moved:.2e} (relative)"
                norm = torch.tensor(reported_norm(got), dtype=torch.float32)
                assert_close_ulps(norm, exact, NORM_ULPS, msg=f"{where}: gradient norm")
    for stage in STAGES:  # averaged over the ranks: different batches, one gradient
        a, b = (r["steps"][config, stage] for r in ranks)
        for engine in RECIPES[config]:
            assert not torch.equal(a[engine]["loss"], b[engine]["loss"])
            for name, grad in a[engine]["grads"].items():
                assert torch.equal(b[engine]["grads"][name], grad), (stage, engine, name)


def test_partitioned_teacher_gives_the_replicated_targets_and_features(ranks):
    for rank, results in enumerate(ranks):
        replicated, partitioned = results["teacher"]["replicate"], results["teacher"]["zero3"]
        assert replicated["shards"] == {}
        for local, whole, outside in partitioned["shards"]["teacher"]:
            assert local == math.ceil(whole / WORLD) and outside == 0, rank
        for key in ("z0_tch", "z_gt"):
            assert torch.equal(partitioned[key], replicated[key]), (rank, key)
        assert len(partitioned["features"]) == len(replicated["features"]) == 3
        for got, want in zip(partitioned["features"], replicated["features"], strict=True):
            assert torch.equal(got, want), rank
    assert not torch.equal(ranks[0]["teacher"]["zero3"]["z0_tch"],
                           ranks[1]["teacher"]["zero3"]["z0_tch"])  # fmt: skip
