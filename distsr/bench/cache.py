"""Cache benchmark: TAD-SR student training steps per second with the teacher cache vs the live
teacher, in one run, same config, same machine.

Makes shards from the bundled photos, a random-weight ResShift teacher — ``size=tiny``: the
4-step tiny teacher of ``tadsr_tiny``; ``size=full``: the released real-SR x4 size of
``tadsr_resshift`` (118.6 M-parameter UNet, VQ-f4, 15 steps, one random 256^2 crop per photo,
batch 1) — has the caller cache its trajectories (``jobs/bench_cache.py``: the Ray actors of
``jobs/cache_teacher.py``), then trains the TAD-SR student in-process for ``steps`` steps twice
— from the cache and with the live teacher, each in a new run folder (``out/runs/{cached,live}``
are replaced; shards and cache are reused) — and reports the ratio of steps per second next to
the FLOP bound (torch's flop counter on one training step, forward + backward, with each
source). The two arms alternate ``repeats`` times; the report gives the median and the range
(min, max) of each arm's steps/s and of the per-repeat ratio. Writes ``out/result.json``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from distsr.bench import stats
from distsr.bench.cli import write_report
from distsr.config import CONFIG_DIR, apply_overrides, from_dict, load_yaml
from distsr.launch import run
from distsr.models.resshift_unet import RESSHIFT_REALSR_X4_KWARGS, UNetModelSwin
from distsr.models.vq import build_vq_f4
from distsr.runconfig import load_run_config

# per size: the TAD-SR config, its teacher's cache config, shard options, run overrides
SIZES = {
    "tiny": ("tadsr_tiny", "cache_resshift_tiny", {"crop_size": 32}, []),
    "full": ("tadsr_resshift", "cache_resshift_realsr_x4",
             {"crop_size": 256, "crop_mode": "random", "random_crops": 1},
             ["data.batch_size=1", "data.num_workers=0", "data.shuffle=8",
              "engine.precision=fp32"]),
}  # fmt: skip

# (cache config name, teacher overrides, shards, output folder) -> the cache folder
CacheFn = Callable[[str, list[str], Path, Path], Path]


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(the bench's own keys, the other ``key=value`` pairs: overrides of the TAD-SR config)."""
    opts = {"size": "tiny", "steps": 30, "crop_size": None, "random_crops": None, "repeats": 3,
            "out": "runs/bench_cache"}  # fmt: skip
    own = [a for a in argv if a.split("=")[0] in opts]
    opts = apply_overrides(opts, own)
    if opts["size"] not in SIZES:
        raise SystemExit(f"size must be one of {sorted(SIZES)}, got {opts['size']!r}")
    opts["shards"] = shard_options(opts)
    return opts, [a for a in argv if a not in own]


def shard_options(opts: dict) -> dict:
    """The size's shard options, ``crop_size`` / ``random_crops`` overridden where given (fewer,
    larger crops: a shorter cache job)."""
    shard_opts = dict(SIZES[opts["size"]][2])
    for key in ("crop_size", "random_crops"):
        if opts.get(key) is not None:
            shard_opts[key] = opts[key]
    return shard_opts


def random_teacher(out: Path, size: str) -> list[str]:
    """Random-weight teacher files of ``size``; overrides pointing a teacher section at them."""
    torch.manual_seed(0)
    unet_file = out / "teacher_unet.safetensors"
    if size == "tiny":
        kwargs = load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"]
    else:
        kwargs = RESSHIFT_REALSR_X4_KWARGS  # the released real-SR x4 UNet
    if not unet_file.exists():
        unet = UNetModelSwin(**kwargs)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    overrides = [f"unet_checkpoint={unet_file}"]
    if size == "full":  # VQ-f4 with random weights (its loader also takes diffusers names)
        vq_file = out / "autoencoder_vq_f4.pth"
        if not vq_file.exists():
            torch.save(build_vq_f4().state_dict(), vq_file)
        overrides.append(f"autoencoder.checkpoint={vq_file}")
    return overrides


def make_data(out: Path, opts: dict) -> Path:
    from distsr.data.config import ShardsConfig
    from distsr.data.shards import make_shards

    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        job = {"inputs": ["bundled"], "output": str(shards),
               "stride": opts["shards"]["crop_size"] * 4, **opts["shards"]}  # fmt: skip
        make_shards(from_dict(ShardsConfig, job))
    return shards


def step_flops(cfg) -> float:
    """FLOPs of one TAD-SR training step (all updates, forward + backward), plain PyTorch."""
    from distsr.registry import get_recipe

    recipe = get_recipe("tadsr")(cfg.method, device=torch.device("cpu"))
    recipe.bind(recipe.trainable())
    batch = next(iter(recipe.make_loader(cfg.data, rank=0, world_size=1, steps=1, seed=0)))
    with FlopCounterMode(display=False) as counter:
        for update in recipe.training_step(batch, 0):
            update.loss.backward()
    return float(counter.get_total_flops())


def timed_run(cfg) -> float:
    # measured afresh every time: an earlier bench's run folder would resume at its last step
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    final = run(cfg)
    print(f"[bench] {cfg.name}: {time.perf_counter() - t0:.1f} s wall", flush=True)
    return 1.0 / final["step_time"]


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements, and each of them."""
    return stats.spread(values) | {"all": [round(v, 4) for v in values]}


def bench_cache(opts: dict, overrides: list[str], cache: CacheFn) -> dict:
    """Run the benchmark (``parse``'s options and overrides); ``cache`` caches the teacher."""
    out = Path(opts["out"]).resolve()
    shards = make_data(out, opts)
    teacher = random_teacher(out, opts["size"])
    config, cache_config, _, size_overrides = SIZES[opts["size"]]
    cache_dir = cache(cache_config, teacher, shards, out / "cache")
    base = [f"output_dir={out / 'runs'}", f"data.shards=[{shards}]", "scaling.ray=false",
            "scaling.num_workers=1", "engine.zero_stage=0", f"engine.max_steps={opts['steps']}",
            f"engine.log_every={opts['steps']}", "engine.checkpoint.every_steps=100000",
            "engine.preview_every=0", *size_overrides,
            *(f"method.teacher.{o}" for o in teacher), *overrides]  # fmt: skip
    cached = load_run_config(config, [*base, "name=cached", f"method.cache_dir={cache_dir}"])
    live = load_run_config(config, [*base, "name=live", "method.cache_dir=null"])
    runs = {"cached": [], "live": []}
    for _ in range(opts["repeats"]):  # alternate the arms so drifts of the machine hit both
        runs["cached"].append(timed_run(cached))
        runs["live"].append(timed_run(live))
    ratios = [c / v for c, v in zip(runs["cached"], runs["live"])]
    result = {
        "steps_per_s_cached": spread(runs["cached"]),
        "steps_per_s_live": spread(runs["live"]),
        "speedup": spread(ratios),
        "repeats": opts["repeats"],
        "flops_per_step_cached": step_flops(cached),
        "flops_per_step_live": step_flops(live),
        "batch_size": cached.data.batch_size,
        "size": opts["size"],
        "crop_size": opts["shards"]["crop_size"],
        "teacher_steps": cached.method.teacher.schedule.steps,
    }
    result["flop_bound"] = result["flops_per_step_live"] / result["flops_per_step_cached"]
    write_report(out, "result", result, None, indent=1)
    return result
