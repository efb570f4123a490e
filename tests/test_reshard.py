"""A ZeRO checkpoint resumes at another world size (``engine/reshard.py``): saved at 2 ranks,
loaded at 1, saved there and loaded at 2 again, through ``checkpoint.save_state`` /
``load_state`` and real DeepSpeed engines on gloo. One spawned process pair runs the three
phases: both ranks train and save (world size 2), tear the group down, rank 0 alone loads and
saves (world size 1, a group of its own), then both rejoin a new group and load that.

Each case (ZeRO-2 and ZeRO-3 in fp32, ZeRO-2 in bf16 as the released configs train, ZeRO-0,
unpartitioned, as the control) trains a tiny network whose parameter sizes are odd (140 and 42),
so the flat ZeRO partitions are padded differently at 1 and 2 ranks, with AdamW and a warm-up
schedule (the lr moves every step), 2 steps on deterministic data (each rank its own half of a
batch). Recorded:
the whole fp32 master weights and Adam moments (gathered by DeepSpeed's ``safe_get_full_*``),
the module's state dict (bf16 weights in bf16, a frozen parameter, and a buffer that differs
between the ranks: rank 0's comes back, as in a same-size load), the schedule's last lr and the
optimizer's and DeepSpeed's step counts. A reshard moves numbers and never rounds them, so all
of these must come back bit for bit (the bf16 weights too: re-rounded from the same fp32
masters). Each load starts from a differently seeded network, so nothing passes by accident.
The 1-rank save leaves out the client state's ``world_size``: the 2-rank load then counts the
saved optimizer partitions (``checkpoint.saved_world_size``).

Then one more step on the same data: at 2 ranks from the original state, at 1 rank (both
halves, one batch) from the resharded one. Averaging two half-batch gradients and taking one
whole-batch gradient differ by rounding only. In fp32 that is a relative e ~ 1e-7 per gradient
element, and AdamW's update lr * m / (sqrt(v) + eps) carries it over at most e relative (v is
dominated by the two exact past steps), so the new weights stay within CONTINUE_REL = 1e-6 of
their 2-norm (observed 1.5e-8; the step itself is 2.7e-2). In bf16 the forward rounds the
activations and gradients to bf16's grid (u = 2^-8), so a gradient element may move by u
relative, and the update by as much: the new fp32 masters stay within u times the step's size
(observed 1.6e-3 of it, at every stage). A step lost or taken twice in the reshard moves the
weights by a whole step.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.ports import patience
from tests.spawned import join_group

WORLD = 2
MICRO = 2  # samples per rank and step; the 1-rank continuation takes both ranks' 2 * MICRO
STEPS = 2
CASES = {  # name -> (engine.zero_stage, engine.precision)
    "zero2_fp32": (2, "fp32"),
    "zero3_fp32": (3, "fp32"),
    "zero2_bf16": (2, "bf16"),  # the released configs' mode (ZeRO-1 and ZeRO-3 in bf16 passed
    # too when tried once; left out to keep the suite short)
    "zero0_fp32": (0, "fp32"),  # not partitioned: loads as it is at any world size
}
CONTINUE_REL = 1e-6
BF16_U = 2.0**-8


class Tiny(nn.Module):
    """Odd parameter sizes (conv 5 x 3 x 3 x 3 + 5 = 140, head 5 x 7 + 7 = 42) and a buffer set
        by the data (a running mean of the input, which the output does not read); a frozen gain:
    the module state the optimizer does not hold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 7)
        self.gain = nn.Parameter(torch.rand(7) + 0.5, requires_grad=False)  # frozen
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x):
        if self.training:
            self.seen.mul_(0.5).add_(x.mean((0, 2, 3)).to(self.seen.dtype), alpha=0.5)
        return self.head(torch.tanh(self.conv(x)).mean((2, 3))) * self.gain


def batch(step: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s samples of ``ranks`` (each rank its own MICRO of the step's batch)."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = (
        torch.randn(WORLD * MICRO, 3, 5, 5, generator=gen),
        torch.randn(WORLD * MICRO, 7, generator=gen),
    )
    rows = torch.cat([torch.arange(r * MICRO, (r + 1) * MICRO) for r in ranks])
    return x[rows], y[rows]


def build(case: str, ctx, seed: int, micro: int):
    from distsr.engine.build import build_engine
    from distsr.engine.config import EngineConfig, OptimizerConfig, SchedulerConfig

    stage, precision = CASES[case]
    cfg = EngineConfig(max_steps=10, zero_stage=stage, precision=precision, grad_clip=0.0,
                       optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.01),
                       scheduler=SchedulerConfig(kind="cosine", warmup_steps=4))  # fmt: skip
    torch.manual_seed(seed)
    return build_engine(Tiny(), cfg, micro, ctx)


def train_step(engine, step: int, ranks: list[int]) -> None:
    x, y = batch(step, ranks)
    out = engine(x.to(engine.module.conv.weight.dtype))
    engine.backward(nn.functional.mse_loss(out.float(), y))
    engine.step()


def record(engine) -> dict:
    """The state a resume must restore (collective at ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from distsr.engine.build import gathered

    out = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "module": {}}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        fp32 = safe_get_full_fp32_param(p)
        if fp32 is None:  # ZeRO-0 in fp32: torch's AdamW steps the parameters themselves
            state = engine.optimizer.state[p]
            fp32, moments = p, [state["exp_avg"], state["exp_avg_sq"]]
        else:
            moments = [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        for key, value in zip(("fp32", "exp_avg", "exp_avg_sq"), (fp32, *moments)):
            out[key][name] = value.detach().clone()
    with gathered(engine):
        out["module"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    opt = engine.optimizer if hasattr(engine.optimizer, "state") else engine.optimizer.optimizer
    steps = {float(s["step"]) for s in opt.state.values() if "step" in s}
    sched = engine.lr_scheduler
    return {**out, "lr": sched.get_last_lr(), "sched_epoch": sched.last_epoch,
            "opt_steps": steps, "global_steps": engine.global_steps}  # fmt: skip


def join(store, prefix: str, rank: int, world: int, timeout: float):
    from distsr.engine.context import from_environment

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    store = dist.PrefixStore(prefix, store)
    wait = datetime.timedelta(seconds=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
    return from_environment()


def leave() -> None:
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups


def rank_main(rank: int, port: int, root: Path, timeout: float) -> None:
    from distsr.engine.checkpoint import load_state, save_state

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)  # the parent's, bound
    results = {"saved": {}, "continued": {}, "loaded1": {}, "continued1": {}, "loaded2": {}}
    ctx = join(store, "ws2-save", rank, WORLD, timeout)
    for case in CASES:
        engine = build(case, ctx, seed=0, micro=MICRO)
        for step in range(STEPS):
            train_step(engine, step, [rank])
        results["saved"][case] = record(engine)
        save_state(root / case / "ws2", {"net": engine}, {"world_size": WORLD}, ctx)
        train_step(engine, STEPS, [rank])
        results["continued"][case] = record(engine)
    del engine
    leave()
    if rank == 0:  # world size 1: a group of its own
        ctx = join(dist.HashStore(), "ws1", 0, 1, timeout)
        for case in CASES:
            engine = build(case, ctx, seed=1, micro=WORLD * MICRO)
            load_state(root / case / "ws2", {"net": engine}, ctx)
            results["loaded1"][case] = record(engine)
            # no "world_size" key: the load counts the saved partitions (saved_world_size)
            save_state(root / case / "ws1", {"net": engine}, {}, ctx)
            train_step(engine, STEPS, list(range(WORLD)))
            results["continued1"][case] = record(engine)
        del engine
        leave()
    ctx = join(store, "ws2-load", rank, WORLD, timeout)  # waits for rank 0's world of one
    for case in CASES:
        engine = build(case, ctx, seed=2, micro=MICRO)
        load_state(root / case / "ws1", {"net": engine}, ctx)
        results["loaded2"][case] = record(engine)
    del engine
    leave()
    torch.save(results, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' records (spawned once for the module); the rendezvous store is served from
    here on a port it bound itself (port 0), held until the ranks are done."""
    root = tmp_path_factory.mktemp("reshard")
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    group = mp.start_processes(rank_main, args=(store.port, root, patience(600)), nprocs=WORLD,
                               join=False, start_method="spawn")  # fmt: skip
    join_group(group, 600, "the 2-rank group")
    del store
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def bit_differences(a, b, where: str = "") -> list[str]:
    """Where two nested dicts of tensors and numbers differ in any bit (or dtype)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return [d for k in a for d in bit_differences(a[k], b[k], f"{where}.{k}")]
    if torch.is_tensor(a):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if a == b else [f"{where}: {a} != {b}"]


def relative_distance(a: dict, b: dict) -> float:
    num = sum((a[k].double() - b[k].double()).square().sum() for k in b)
    return float((num / sum(v.double().square().sum() for v in b.values())).sqrt())


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_resume_at_one_bit_for_bit(ranks, case):
    saved = ranks[0]["saved"][case]
    assert bit_differences(ranks[1]["saved"][case], saved) == [".module.seen"]
    assert saved["global_steps"] == saved["sched_epoch"] == STEPS
    assert saved["opt_steps"] == {float(STEPS)}
    assert bit_differences(ranks[0]["loaded1"][case], saved, case) == []


@pytest.mark.parametrize("case", list(CASES))
def test_one_rank_resumes_at_two_bit_for_bit(ranks, case):
    for rank, results in enumerate(ranks):
        got = results["loaded2"][case]
        assert bit_differences(got, ranks[0]["saved"][case], f"{case}, rank {rank}") == []


@pytest.mark.parametrize("case", list(CASES))
def test_training_continues_after_the_reshard(ranks, case):
    want, got = ranks[0]["continued"][case], ranks[0]["continued1"][case]
    assert got["global_steps"] == want["global_steps"] == STEPS + 1
    assert got["lr"] == want["lr"] and got["opt_steps"] == want["opt_steps"]
    step = relative_distance(ranks[0]["saved"][case]["fp32"], want["fp32"])
    bound = BF16_U * step if CASES[case][1] == "bf16" else CONTINUE_REL
    moved = relative_distance(got["fp32"], want["fp32"])
    assert moved <= bound, f"{case}: one more step moved the weights by {moved:.2e} (relative)"
    assert step > 100 * bound  # a lost or repeated step is far outside the bound
