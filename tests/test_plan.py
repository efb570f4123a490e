"""``python -m distsr.plan``: its numbers against independent runs of the real components.

* FLOPs: the real recipe's ``training_step`` on CPU with real tensors (and every update's
  backward, as the engine runs it) under ``FlopCounterMode`` equals the planned step (+ the
  planned cache FLOPs per sample x batch, since the shipped tiny config runs the live teacher).
* Bytes: shards written by ``jobs/make_shards.py`` (of incompressible noise images, the PNG
  bound the planner states) and a cache written by the cache job, tar bytes / samples, equal
  the planned bytes per sample; the only difference allowed is the tar's end (two 512 B zero
  blocks, padded to tarfile's 10240 B record).
* Memory: the planned parameter / gradient / optimizer / EMA / frozen bytes equal sums over the
  real instantiated tiny models' parameters.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distsr.models.resshift import ResShift
from distsr.models.resshift_unet import UNetModelSwin
from distsr.plan.__main__ import main as plan_main
from distsr.plan.bytes import cache_sample_bytes, shard_sample_bytes
from distsr.plan.hardware import PEAK_TFLOPS
from distsr.plan.memory import memory_plan
from distsr.plan.report import load, make_plan
from distsr.plan.workload import build_workload
from distsr.recipes.resshift import ResShiftRecipe
from distsr.recipes.tadsr import TadsrRecipe
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.resshift import ResShiftTeacher
from tests.conftest import load_job

CPU = torch.device("cpu")
ONE = ["data.batch_size=1"]  # FLOPs are linear in the batch: the smallest keeps the run short
TAR_END = (1024, 1024 + 10240)  # two zero blocks, then padding to the 10240 B record


def random_teacher(spec) -> ResShiftTeacher:
    torch.manual_seed(0)
    return ResShiftTeacher(spec, ResShift(spec, unet=UNetModelSwin(**spec.unet)))


def tadsr_recipe(overrides=()):
    cfg, _ = load("tadsr_tiny", list(overrides))
    recipe = TadsrRecipe(cfg.method, device=CPU, teacher=random_teacher(cfg.method.teacher))
    recipe.bind({"disc": recipe.disc, "student": recipe.student})
    return cfg, recipe


def batch_of(cfg, gt: int) -> dict:
    b, lq = cfg.data.batch_size, gt // cfg.data.scale
    return {"__key__": [f"k{i}" for i in range(b)], "gt": torch.rand(b, 3, gt, gt),
            "lq": torch.rand(b, 3, lq, lq)}  # fmt: skip


def counted():
    """``FlopCounterMode`` with attention on the math backend: FlopCounterMode has no formula
    for the CPU flash-attention kernel (it counts 0), while the GPU kernels' formulas and the
    math backend's bmm count the same FLOPs (the planner's meta tensors take the math path)."""
    return FlopCounterMode(display=False), sdpa_kernel(SDPBackend.MATH)


def step_flops(recipe, batch) -> int:
    """FLOPs of one real training step: each update's loss backpropagated before the next."""
    counter, math = counted()
    with counter, math:
        for update in recipe.training_step(batch, step=0):
            update.loss.backward()
    return counter.get_total_flops()


def test_tadsr_tiny_flops_equal_a_real_training_step(one_thread):
    cfg, recipe = tadsr_recipe(ONE)
    plan = make_plan("tadsr_tiny", ONE, 1, "cpu")
    real = step_flops(recipe, batch_of(cfg, plan["gt_size"]))
    flops = plan["flops"]
    # the shipped config has no cache_dir: the live teacher samples each step, in the step
    assert real == flops["step_per_rank"] + cfg.data.batch_size * flops["cache_per_sample"]
    # the inference figures: the student's one call and the teacher's T calls at batch 1
    teacher = recipe.teacher
    cond = teacher.prepare(torch.rand(1, 3, 8, 8))
    counter, math = counted()
    with counter, math, torch.no_grad():
        teacher.sample(cond, torch.randn(1, *teacher.noise_shape(cond)))
    assert counter.get_total_flops() == flops["infer_teacher_per_image"]
    counter, math = counted()
    with counter, math, torch.no_grad():
        teacher.student_step(recipe.student, teacher.prior(cond, torch.randn(1, 3, 32, 32)), cond)
    assert counter.get_total_flops() == flops["infer_student_per_image"]


def test_resshift_tiny_flops_equal_a_real_training_step(one_thread):
    cfg, _ = load("resshift_tiny", ONE)
    recipe = ResShiftRecipe(cfg.method, device=CPU)
    recipe.bind({"unet": recipe.net})
    plan = make_plan("resshift_tiny", ONE, 1, "cpu")
    assert step_flops(recipe, batch_of(cfg, plan["gt_size"])) == plan["flops"]["step_per_rank"]


def noise_images(folder, count: int, size: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"noise{i}.png")


def test_bytes_per_sample_equal_written_shards_and_cache(tmp_path):
    noise_images(tmp_path / "images", 3, 64)  # incompressible content: the planned bound
    shards = tmp_path / "shards"
    load_job("make_shards").main([f"inputs=[{tmp_path / 'images'}]", f"output={shards}",
                                  "crop_size=32", "shard_size=100"])  # fmt: skip
    cfg, _ = load("tadsr_tiny", [])
    workload = build_workload(cfg.name, cfg)
    assert workload.gt_size == 32
    (shard,) = shards.glob("*.tar")
    n = 12  # 3 images x 4 crops of 32
    extra = shard.stat().st_size - n * shard_sample_bytes(32, cfg.data.scale)["bytes"]
    assert TAR_END[0] <= extra < TAR_END[1]

    job = CacheJobConfig(shards=[str(shards)], output=str(tmp_path / "cache"), batch_size=4)
    run_in_process(job, random_teacher(cfg.method.teacher))
    (cached,) = (tmp_path / "cache").glob("*/*.tar")
    extra = cached.stat().st_size - n * cache_sample_bytes(workload.cache_fields)["bytes"]
    assert TAR_END[0] <= extra < TAR_END[1]


def numel(module, trainable=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_equals_sums_over_the_real_parameters(precision):
    world = 4
    overrides = [f"engine.precision={precision}", "method.teacher_partition=zero3"]
    cfg, recipe = tadsr_recipe(overrides)
    stages = memory_plan(build_workload(cfg.name, cfg), cfg, world, 0)["stages"]
    w = 2 if precision == "bf16" else 4
    # AdamW moments, + the fp32 master with bf16 or a ZeRO optimizer
    opt = lambda stage: 8 + (4 if precision == "bf16" or stage else 0)  # noqa: E731
    total = numel(recipe.student) + numel(recipe.disc)
    trained = numel(recipe.student, True) + numel(recipe.disc, True)
    teacher = sum(p.numel() * p.element_size() for p in recipe.teacher.parameters())
    for stage, parts in stages.items():
        assert parts["params"] == pytest.approx(total * w / (world if stage == 3 else 1), abs=1)
        assert parts["grads"] == pytest.approx(trained * w / (world if stage >= 2 else 1), abs=1)
        want = trained * opt(stage) / (world if stage else 1)
        assert parts["optimizer"] == pytest.approx(want, abs=1)
        assert parts["ema"] == numel(recipe.student, True) * 4
        assert parts["frozen"] == pytest.approx(teacher / world, abs=1)


def test_cli_plans_tadsr_seesr_on_64_h100(tmp_path, capsys):
    out = tmp_path / "plan.json"
    start = time.process_time()
    assert plan_main(["tadsr_seesr", "--gpus", "64", "--gpu", "h100", "--json", str(out)]) == 0
    assert time.process_time() - start < 60
    text = capsys.readouterr().out
    assert "## FLOPs" in text and "## memory per rank" in text and "## projection" in text
    plan = json.loads(out.read_text())
    step, steps = plan["flops"]["step_per_rank"], plan["projection"]["max_steps"]
    peak = PEAK_TFLOPS["h100"]["bf16"] * 1e12
    assert plan["projection"]["train_gpu_hours"] == pytest.approx(
        steps * step / (peak * 0.35) * 64 / 3600, rel=1e-9
    )
    # the SeeSR cache: 50 DDPM steps x 2 (classifier-free guidance) calls of the pair at batch 1
    cache = plan["flops"]["cache_calls"][0]
    assert cache["times"] == 100 and plan["flops"]["infer_student_per_image"] == cache["fwd"]


def held_bytes(obj, seen: set) -> int:
    """Bytes of the distinct non-scalar tensors in nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen or obj.dim() == 0:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(held_bytes(v, seen) for v in obj)
    return 0


def fp32_masters(optimizer) -> list:
    """The fp32 master weights a DeepSpeed optimizer keeps apart from the weights: bf16 at ZeRO-0
    (``fp32_groups``), any precision at ZeRO-1/2 (the flat fp32 partition); none for fp32
    ZeRO-0 (torch's AdamW on the weights themselves)."""
    for attr in ("fp32_groups", "single_partition_of_fp32_groups"):
        if getattr(optimizer, attr, None):
            return getattr(optimizer, attr)
    return []


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_equals_what_a_real_engine_holds(precision, stage):
    """resshift_tiny's engine built by DeepSpeed (world size 1) after one step: the bytes of its
    weights, of its optimizer's moments and fp32 masters, and of the EMA shadow, measured on the
    tensors the engine holds, equal the plan (gradients are freed by the step: not measured).
    This found the fp32 master that ZeRO-1/2 keeps in fp32 too."""
    from distsr.engine.build import build_engine
    from distsr.engine.context import init_in_process
    from distsr.engine.ema import EMA

    cfg, _ = load("resshift_tiny", [f"engine.precision={precision}", f"engine.zero_stage={stage}"])
    planned = memory_plan(build_workload(cfg.name, cfg), cfg, 1, 0)["stages"][stage]
    recipe = ResShiftRecipe(cfg.method, device=CPU)
    ((_, module),) = recipe.trainable().items()
    engine = build_engine(module, cfg.engine, 1, init_in_process())
    engine.backward(sum(p.float().sum() for p in engine.module.parameters()))
    engine.step()
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's wrapper -> torch AdamW
    seen: set = set()
    moments = held_bytes(list(inner.state.values()), seen)
    masters = held_bytes(fp32_masters(optimizer), seen)
    weights = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    ema = held_bytes(EMA(engine, 0.999).state_dict(), set())
    assert weights == planned["params"]
    assert ema == planned["ema"]
    # ZeRO-1/2 pads its flat partition to an alignment: a few elements at most
    assert planned["optimizer"] <= moments + masters <= planned["optimizer"] + 64 * 12


@pytest.mark.parametrize("config", ["mtkd_tiny", "dtkd_srmdnf", "mtkd_swinir_light"])
def test_kd_student_flops_equal_a_real_forward_and_backward(config, one_thread):
    """A KD step from the cache is the student's forward + backward (the L1 / wavelet losses
    count no FLOPs); the student here is built on the CPU with real weights and inputs."""
    from distsr.recipes.kd import build_student

    overrides = ["data.batch_size=2", "data.gt_size=32"]
    cfg, _ = load(config, overrides)
    plan = make_plan(config, overrides, 1, "cpu")
    student = build_student(cfg.method.student)
    lq = torch.rand(2, 3, 32 // cfg.method.student.scale, 32 // cfg.method.student.scale)
    counter, math = counted()
    with counter, math:
        student(lq).sum().backward()
    assert counter.get_total_flops() == plan["flops"]["step_per_rank"]
    counter, math = counted()
    with counter, math, torch.no_grad():
        student(lq[:1])
    assert counter.get_total_flops() == plan["flops"]["infer_student_per_image"]
