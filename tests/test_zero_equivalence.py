"""ZeRO stages 0-3 train the same steps, and a ZeRO-3-partitioned frozen teacher computes and
trains what the replicated one does. Two ranks: a gloo group of 2 spawned processes (each rank
runs every stage in turn, so the group starts once), real DeepSpeed engines, the real shard
reader. Each run takes STEPS = 3 optimizer steps as the loop applies them; the whole weights and
Adam moments after the last one are gathered from the ZeRO partitions by DeepSpeed's helpers
(``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``).

Every stage starts from rank 0's broadcast weights, reads the same batch and draws the same
noise, so the stages may differ only by rounding. Where it comes from: ZeRO-1/2 keep the
parameters as views into one flat buffer and ZeRO-3 gathers them into fresh buffers, so the
CPU's GEMM and convolution kernels run on other memory alignments and may block their sums
differently (observed: the discriminator's loss 3 ulps apart on one rank, ResShift's bit-equal).
The tolerances of the first step, stage s against stage 0, per rank:
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
2 values (commutative, exactly rounded) and halves them (exact). So at world size 2 the
reduction order is not where the stages differ (nor bucket sizes: an element's sum is a + b in
every stage); the flat buffers above and the optimizer are.

Over the STEPS steps (fp32), stage s against stage 0, per rank: every step's loss within
LOSS_ULPS and reported norm within NORM_ULPS of the float64 norm of stage 0's gradient of that
step (after step 1 the weights differ by rounding, so later gradients move a little more:
observed 3e-7 relative, 5 ulps). After the last step, per engine, weights, exp_avg and
exp_avg_sq each within FINAL_REL_ULPS = 128 ulps of their 2-norm: |x_s - x_0| <= 128 * 2^-24
|x_0| (2-norms over all parameters; observed 7.3e-7, 12 ulps, TAD-SR's discriminator). Why
the whole tensor and not each element: ZeRO-1/2/3 step torch's AdamW on flat fp32 partitions,
stage 0 on each parameter, and the vectorised and scalar paths round the update's multiply-adds
differently (ResShift, whose losses and gradients stay bit-equal at ZeRO-1/2, ends 2 ulps of
each tensor's largest weight apart); and AdamW normalises each element by its own history,
lr * m / (sqrt(v) + eps), so an element whose gradient is at the rounding noise (its terms
cancel) may step the other way: up to ~2 lr in that element (observed: 1.2e4 ulps of the
tensor's largest weight in TAD-SR's student), and a moment near 0 is any number of its own ulps
off. A stage that skips or repeats a step moves every element by ~lr (some 1e-3 of the
weights' norm: tens of thousands of these ulps); a gradient not averaged over the ranks leaves
AdamW's weights nearly alone (scale-invariant) but doubles exp_avg and quadruples exp_avg_sq.
Both ranks end every stage with the same weights and moments, bit for bit.

In bf16 (bf16 weights, activations and gradients, fp32 master weights and moments) the
reference is ZeRO-1: ZeRO-0 is DeepSpeed's FP16_UnfusedOptimizer, which steps AdamW once on zero
gradients before training (``BF16_ZERO0_BUG``), undone by ``engine.build.undo_warmup_step``;
test_bf16_zero0_trains_as_zero1 holds it to ZeRO-1. ZeRO-2 equals ZeRO-1 bit for bit
(observed; same flat buffers, same optimizer).
ZeRO-3 gathers the bf16 weights into fresh buffers, and a kernel that blocks its fp32 sums
differently may round an activation to the other bf16 neighbour, a relative 2^-8 = u: a step
to bf16's grid, not to float32's, and carried on through 3 steps. Bounds in u: losses within
BF16_LOSS_REL = 2u, reported norms within BF16_NORM_REL = 4u of the reference's float64 norm,
final master weights within BF16_WEIGHTS_REL = u and moments within BF16_MOMENTS_REL = 8u of
their 2-norm (observed: 0.46u, 0.85u, 0.19u and 2u, the moments of TAD-SR's discriminator).
A skipped step or an unaveraged gradient moves the moments by tens of percent (16-37 % for
the ZeRO-0 bug above).

The ZeRO-3-partitioned teacher's targets (its 4-step trajectory) and the encoder features the
discriminator reads equal the replicated teacher's bit for bit: the gathered weights are exact
copies and the teacher's buffers are its own, so the same kernels run on the same shapes
(unlike the trained engines above, nothing is flattened). Hence TAD-SR trains with the
partitioned teacher exactly as with the replicated one at every stage: losses, norms,
gradients, weights and moments bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from distsr.config import CONFIG_DIR, load_yaml
from distsr.models.resshift_unet import UNetModelSwin
from tests.conftest import tiny_overrides
from tests.spawned import join_group
from tests.ulps import assert_close_ulps

pytestmark = pytest.mark.slow

WORLD = 2
STAGES = (0, 1, 2, 3)
STEPS = 3
MOMENTS = ("exp_avg", "exp_avg_sq")
LOSS_ULPS = 16
GRAD_REL = 1e-5
NORM_ULPS = 64
FINAL_REL_ULPS = 128
BF16_ZERO0_BUG = (
    "bf16 at ZeRO-0 is DeepSpeed's FP16_UnfusedOptimizer, whose initialize_optimizer_states() "
    "runs the torch optimizer's step() once on zero gradients: AdamW's step count starts at 1, "
    "so its bias correction is one step behind (the first update is 0.744 lr, not lr) and "
    "weight decay is applied once before training (observed: losses 7-18 % off at step 2)"
)
BF16_U = 2.0**-8  # bf16's unit roundoff
BF16_LOSS_REL, BF16_NORM_REL = 2 * BF16_U, 4 * BF16_U
BF16_WEIGHTS_REL, BF16_MOMENTS_REL = BF16_U, 8 * BF16_U
RECIPES = {  # config -> its engines
    "resshift_tiny": ("unet",),
    "tadsr_tiny": ("disc", "student"),
}
RUNS = [  # (config, engine.precision, method.teacher_partition), each at every ZeRO stage
    ("resshift_tiny", "fp32", "replicate"),
    ("tadsr_tiny", "fp32", "replicate"),
    ("tadsr_tiny", "fp32", "zero3"),
    ("resshift_tiny", "bf16", "replicate"),
    ("tadsr_tiny", "bf16", "replicate"),
]


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
                 f"engine.max_steps={STEPS}", "engine.preview_every=0",
                 "engine.tensorboard=false", f"scaling.num_workers={WORLD}", *extra]  # fmt: skip
    if config == "tadsr_tiny":
        overrides.append(f"method.teacher.unet_checkpoint={teacher}")
    return load_run_config(config, tiny_overrides(root, shards, *overrides))


def train_steps(cfg, ctx) -> dict:
    """``STEPS`` optimizer steps of every update, as the loop applies them
    (``Trainer.micro_step``): per step and engine the loss, the norm the engine reports and (first
    step) the rank-averaged gradient, read between backward and step; after the last step each
    engine's whole fp32 weights and Adam moments (``final_state``)."""
    from deepspeed.utils import safe_get_full_grad

    from distsr.engine.loop import Trainer

    trainer = Trainer(cfg, ctx, NoCheckpoints())
    steps = []
    for batch in trainer.make_loader(STEPS):
        batch.pop("skipped", None)
        out = {}
        for update in trainer.recipe.training_step(batch, trainer.step):
            engine = trainer.engines[update.engine]
            engine.backward(update.loss)
            grads = {n: safe_get_full_grad(p).detach().float().clone()
                     for n, p in engine.module.named_parameters() if p.requires_grad}  # fmt: skip
            engine.step()
            norm = engine.get_global_grad_norm()
            out[update.engine] = {"loss": update.loss.detach().float().clone(),
                                  "grads": {} if steps else grads, "norm64": norm64(grads),
                                  "norm32": norm32(grads),
                                  "norm": None if norm is None else float(norm)}  # fmt: skip
        steps.append(out)
        trainer.step += 1
    final = {name: final_state(engine) for name, engine in trainer.engines.items()}
    return {"steps": steps, "final": final}


def final_state(engine) -> dict:
    """The engine's whole fp32 weights (the optimizer's master copy) and Adam moments, gathered
    from the ZeRO partitions by DeepSpeed's own helpers (collective at ZeRO-1/2/3). ZeRO-0 has no
    partitions and the helpers return None: ``unpartitioned_state``."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    unpartitioned = None
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        weights = safe_get_full_fp32_param(p)
        if weights is None:
            unpartitioned = unpartitioned or unpartitioned_state(engine)
            weights, *moments = unpartitioned[p]
        else:
            moments = [safe_get_full_optimizer_state(p, key) for key in MOMENTS]
        for key, value in zip(("weights", *MOMENTS), (weights, *moments), strict=True):
            out[key][name] = value.detach().float().clone()
    return out


def unpartitioned_state(engine) -> dict:
    """ZeRO-0: parameter -> (master weights, exp_avg, exp_avg_sq). In fp32 torch's optimizer
    steps the parameters themselves; in bf16 DeepSpeed's FP16_UnfusedOptimizer steps an fp32
    master copy of each (``fp32_groups`` beside the module's ``fp16_groups``)."""
    opt = engine.optimizer
    if not hasattr(opt, "fp32_groups"):
        return {p: (p, *(opt.state[p][key] for key in MOMENTS))
                for group in opt.param_groups for p in group["params"]}  # fmt: skip
    return {p: (master, *(opt.optimizer.state[master][key] for key in MOMENTS))
            for params, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
            for p, master in zip(params, masters, strict=True)}  # fmt: skip


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
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)  # the parent's, bound
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    ctx = from_environment()
    results = {"runs": {}, "teacher": {}}
    for run in RUNS:
        config, precision, partition = run
        for stage in STAGES:
            extra = [f"engine.precision={precision}"]
            if config == "tadsr_tiny":
                extra.append(f"method.teacher_partition={partition}")
            cfg = run_config(config, stage, root, shards, teacher, *extra)
            try:
                results["runs"][(*run, stage)] = train_steps(cfg, ctx)
            except Exception:  # both ranks fail alike (a precision bug): record it, go on
                results["runs"][(*run, stage)] = {"error": traceback.format_exc()}
    for partition in ("replicate", "zero3"):
        cfg = run_config("tadsr_tiny", 2, root, shards, teacher,
                         f"method.teacher_partition={partition}")  # fmt: skip
        results["teacher"][partition] = teacher_outputs(cfg, ctx)
    torch.save(results, root / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_shards, tmp_path_factory) -> list[dict]:
    """Both ranks' results (spawned once for the module). The group's rendezvous store is
    served from here on a port it bound itself (port 0), held until the ranks are done: no
    port is chosen free and bound later by someone else."""
    root = tmp_path_factory.mktemp("zero")
    torch.manual_seed(0)
    unet = UNetModelSwin(**load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"])
    teacher = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(teacher))
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    group = mp.start_processes(rank_main, args=(store.port, root, tiny_shards, teacher),
                               nprocs=WORLD, join=False, start_method="spawn")  # fmt: skip
    join_group(group, 840, "the 2-rank group")  # under the suite's 900 s per test
    del store
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def norm64(grads: dict) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))


def distance64(a: dict, b: dict) -> float:
    return math.sqrt(sum((a[n].double() - g.double()).square().sum().item() for n, g in b.items()))


def norm32(grads: dict) -> float:
    return sum(g.square().sum() for g in grads.values()).sqrt().item()


def reported_norm(step: dict) -> float:
    """DeepSpeed's norm (ZeRO-1/2/3); stage 0 reports none: summed in float32 (``norm32``)."""
    return step["norm32"] if step["norm"] is None else step["norm"]


def run_of(results: dict, config: str, stage: int, precision: str = "fp32",
           partition: str = "replicate") -> dict:  # fmt: skip
    out = results["runs"][config, precision, partition, stage]
    assert "error" not in out, out.get("error")
    return out


@pytest.mark.parametrize("config", list(RECIPES))
def test_zero_stages_compute_the_same_first_step(ranks, config):
    for rank, results in enumerate(ranks):
        for engine in RECIPES[config]:
            want = run_of(results, config, 0)["steps"][0][engine]
            exact = torch.tensor(norm64(want["grads"]), dtype=torch.float32)
            for stage in STAGES:
                got = run_of(results, config, stage)["steps"][0][engine]
                where = f"rank {rank}, ZeRO-{stage}, {engine}"
                assert_close_ulps(got["loss"], want["loss"], LOSS_ULPS, msg=f"{where}: loss")
                assert got["grads"].keys() == want["grads"].keys()
                moved = distance64(got["grads"], want["grads"]) / norm64(want["grads"])
                assert moved <= GRAD_REL, f"{where}: gradient moved by {moved:.2e} (relative)"
                norm = torch.tensor(reported_norm(got), dtype=torch.float32)
                assert_close_ulps(norm, exact, NORM_ULPS, msg=f"{where}: gradient norm")
    for stage in STAGES:  # averaged over the ranks: different batches, one gradient
        a, b = (run_of(r, config, stage)["steps"][0] for r in ranks)
        for engine in RECIPES[config]:
            assert not torch.equal(a[engine]["loss"], b[engine]["loss"])
            for name, grad in a[engine]["grads"].items():
                assert torch.equal(b[engine]["grads"][name], grad), (stage, engine, name)


def assert_same_steps(got: dict, want: dict, engines, bound: dict, where: str) -> None:
    """Per step the losses and reported gradient norms, after the last step the whole weights and
    Adam moments of ``got`` within ``bound`` of ``want``'s (see the module's docstring)."""
    assert len(got["steps"]) == len(want["steps"]) == STEPS
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True), start=1):
        for engine in engines:
            at = f"{where}, step {step}, {engine}"
            if bound["loss_ulps"] is not None:
                assert_close_ulps(g[engine]["loss"], w[engine]["loss"], bound["loss_ulps"],
                                  msg=f"{at}: loss")  # fmt: skip
                exact = torch.tensor(w[engine]["norm64"], dtype=torch.float32)
                norm = torch.tensor(reported_norm(g[engine]), dtype=torch.float32)
                assert_close_ulps(norm, exact, bound["norm_ulps"], msg=f"{at}: gradient norm")
            else:
                assert_close_rel(g[engine]["loss"].item(), w[engine]["loss"].item(),
                                 bound["loss_rel"], f"{at}: loss")  # fmt: skip
                assert_close_rel(reported_norm(g[engine]), w[engine]["norm64"],
                                 bound["norm_rel"], f"{at}: gradient norm")  # fmt: skip
    for engine in engines:
        for key in ("weights", *MOMENTS):
            a, b = got["final"][engine][key], want["final"][engine][key]
            assert a.keys() == b.keys() and a
            moved = distance64(a, b) / norm64(b)
            limit = bound["final_rel"]
            if key in MOMENTS:
                limit = bound.get("moments_rel", limit)
            assert moved <= limit, (
                f"{where}, {engine}: {key} after {STEPS} steps moved by {moved:.2e} (relative), "
                f"at most {limit:.2e} allowed"
            )


def assert_close_rel(got: float, want: float, rel: float, msg: str) -> None:
    assert abs(got - want) <= rel * abs(want), f"{msg}: {got!r} vs {want!r} (rel. {rel:.1e})"


FP32 = {"loss_ulps": LOSS_ULPS, "norm_ulps": NORM_ULPS, "final_rel": FINAL_REL_ULPS * 2.0**-24}
BF16 = {"loss_ulps": None, "loss_rel": BF16_LOSS_REL, "norm_rel": BF16_NORM_REL,
        "final_rel": BF16_WEIGHTS_REL, "moments_rel": BF16_MOMENTS_REL}  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("config", list(RECIPES))
def test_zero_stages_train_the_same_steps(ranks, config, precision):
    """STEPS optimizer steps at every stage against the reference stage (fp32: ZeRO-0, bf16:
    ZeRO-1, see ``test_bf16_zero0_trains_as_zero1``) on each rank; both ranks end every stage
    with the same weights and moments, bit for bit."""
    bound, reference = (FP32, 0) if precision == "fp32" else (BF16, 1)
    for rank, results in enumerate(ranks):
        want = run_of(results, config, reference, precision)
        for stage in STAGES[reference + 1 :]:
            got = run_of(results, config, stage, precision)
            where = f"{precision}, rank {rank}, ZeRO-{stage} vs ZeRO-{reference}"
            assert_same_steps(got, want, RECIPES[config], bound, where)
    for stage in STAGES:
        a, b = (run_of(r, config, stage, precision)["final"] for r in ranks)
        assert bit_differences(a, b) == [], (precision, stage)


@pytest.mark.parametrize("config", list(RECIPES))
def test_bf16_zero0_trains_as_zero1(ranks, config):
    """Fails without undo_warmup_step: ``BF16_ZERO0_BUG``."""
    for rank, results in enumerate(ranks):
        want, got = (run_of(results, config, stage, "bf16") for stage in (1, 0))
        assert_same_steps(got, want, RECIPES[config], BF16, f"bf16, rank {rank}, ZeRO-0")


def bit_differences(a: dict, b: dict, where: str = "") -> list[str]:
    """Where two nested dicts of tensors and numbers differ in any bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return [d for k in a for d in bit_differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list):
        assert len(a) == len(b), where
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in bit_differences(x, y, f"{where}[{i}]")]  # fmt: skip
    same = torch.equal(a, b) if torch.is_tensor(a) else a == b
    return [] if same else [where]


def test_partitioned_teacher_trains_as_the_replicated_one(ranks):
    """TAD-SR with its teacher partitioned by ZeRO-3 trains, at every ZeRO stage of its own
    engines, exactly as with the teacher replicated: losses, norms, gradients, weights and
    moments bit for bit (its targets and features are bit-equal, see below)."""
    for rank, results in enumerate(ranks):
        for stage in STAGES:
            partitioned = run_of(results, "tadsr_tiny", stage, partition="zero3")
            replicated = run_of(results, "tadsr_tiny", stage)
            assert bit_differences(partitioned, replicated) == [], (rank, stage)


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
