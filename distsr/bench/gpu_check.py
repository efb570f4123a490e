"""The GPU check: the numbers a session or user with a GPU records in one command (on one H100
in well under 8 minutes), written as ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``:

* ``resshift_train``: the released-size ResShift UNet (``RESSHIFT_REALSR_X4_KWARGS``, 64^2
  latents) training step in bf16 autocast with AdamW: samples/s, peak memory, and the MFU of
  the FLOPs torch's counter finds in one step (forward + backward) against the device's peak;
* ``seesr_train``: the released-size SeeSR UNet + ControlNet (SD-2-base layout, random
  weights) forward + backward at 64^2 latents in bf16: the same three numbers;
* ``cache_vs_live``: the TAD-SR student step with the teacher cache against the live teacher
  at released size (``distsr.bench.cache``, the cache made in process);
* ``infer``: seconds per 64 -> 256 image of the ResShift-15 teacher and the one-step student
  (``distsr.bench.infer``).
On a CPU the same code runs at tiny size (``size=tiny``): the configs of the tiny tests.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distsr.bench import cache as bench_cache
from distsr.bench.cli import write_report
from distsr.bench.infer import BenchInferConfig, bench_infer
from distsr.bench.stats import spread
from distsr.config import CONFIG_DIR, apply_overrides, load_yaml
from distsr.evaluate.memory import peak_meter
from distsr.models.resshift_unet import RESSHIFT_REALSR_X4_KWARGS, UNetModelSwin
from distsr.plan.hardware import PEAK_TFLOPS, peak_flops
from distsr.teachers.cache_job import run_in_process

DEFAULTS = {"size": "full", "device": "cuda", "precision": "bf16", "batch_size": 8, "steps": 10,
            "warmup": 3, "repeats": 3, "out": "runs/gpu_check"}  # fmt: skip
# a CPU has no bf16 units here (~7x slower than fp32): the tiny run keeps the code, not the dtype
TINY = {"size": "tiny", "device": "cpu", "precision": "fp32", "batch_size": 1, "steps": 1,
        "warmup": 0, "repeats": 1}  # fmt: skip


def parse(argv: list[str]) -> dict:
    """``key=value`` options; ``size=tiny`` also takes the tiny defaults (CPU, 2 steps)."""
    opts = apply_overrides(dict(DEFAULTS), list(argv))
    if opts["size"] == "tiny":
        opts = apply_overrides({**DEFAULTS, **TINY}, list(argv))
    if opts["size"] not in ("tiny", "full"):
        raise ValueError(f"size must be tiny or full, got {opts['size']!r}")
    if opts["precision"] not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {opts['precision']!r}")
    if opts["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible; run size=tiny device=cpu here")
    return opts


def gpu_kind(device: torch.device) -> str:
    """The peak table's key of this device (``cpu`` when unknown)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((k for k in PEAK_TFLOPS if k != "cpu" and k in name), "cpu")


def timed_steps(step: Callable[[], None], opts: dict, device: torch.device) -> dict:
    """Warm-up, the FLOPs of one step, then ``steps`` timed steps per repeat and the peak."""
    for _ in range(opts["warmup"]):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    meter, secs, peak = peak_meter(device), [], 0.0
    for _ in range(opts["repeats"]):
        start = meter.start()
        t0 = time.perf_counter()
        for _ in range(opts["steps"]):
            step()
        sync(device)
        secs.append((time.perf_counter() - t0) / opts["steps"])
        peak = max(peak, meter.stop(start) or 0.0)
    flops = float(counter.get_total_flops())
    s = spread(secs)
    kind = gpu_kind(device)
    return {"seconds_per_step": s, "samples_per_s": opts["batch_size"] / s["median"],
            "flops_per_step": flops, "peak_mib": round(peak, 1), "device_kind": kind,
            "mfu": flops / s["median"] / peak_flops(kind, opts["precision"])}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(net: torch.nn.Module, make_loss: Callable[[], torch.Tensor], opts: dict, device):
    """One AdamW step of ``net`` on ``make_loss()`` (bf16: under bf16 autocast)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    bf16 = opts["precision"] == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = make_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def resshift_unet(size: str) -> tuple[UNetModelSwin, int]:
    """(the ResShift UNet of ``size``, its latent side)."""
    if size == "full":
        return UNetModelSwin(**RESSHIFT_REALSR_X4_KWARGS), RESSHIFT_REALSR_X4_KWARGS["lq_size"]
    kwargs = load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"]
    return UNetModelSwin(**kwargs), kwargs["lq_size"]


def resshift_train(opts: dict, device: torch.device) -> dict:
    torch.manual_seed(0)
    net, side = resshift_unet(opts["size"])
    net = net.to(device).train()
    b = opts["batch_size"]
    x, lq = (
        torch.randn(b, 3, side, side, device=device),
        torch.randn(b, 3, side, side, device=device),
    )
    t = torch.randint(0, 15, (b,), device=device)
    loss = lambda: (net(x, t, lq=lq).float() - x).square().mean()  # noqa: E731
    return {"params": count(net), "latent": side,
            **timed_steps(train_step(net, loss, opts, device), opts, device)}  # fmt: skip


def seesr_pair(size: str):
    """(SeeSRDenoiser with random weights, its latent side, text tokens, text width)."""
    from distsr.models.seesr import (
        SD2_BASE_UNET_CONFIG,
        SeeSRControlNet,
        SeeSRUNet,
        controlnet_config,
    )
    from distsr.teachers.seesr import SeeSRDenoiser
    from distsr.teachers.seesr_tiny import TINY_MAX_LENGTH, TINY_UNET

    config, side, tokens = (
        (SD2_BASE_UNET_CONFIG, 64, 77) if size == "full" else (TINY_UNET, 16, TINY_MAX_LENGTH)
    )
    unet = SeeSRUNet(**config)
    return (SeeSRDenoiser(unet, SeeSRControlNet(**controlnet_config(config))), side, tokens,
            config["cross_attention_dim"])  # fmt: skip


def seesr_train(opts: dict, device: torch.device) -> dict:
    torch.manual_seed(0)
    net, side, tokens, width = seesr_pair(opts["size"])
    net = net.to(device).train()
    b = opts["batch_size"]
    z_t = torch.randn(b, 4, side, side, device=device)
    cond = {"prompt_embeds": torch.randn(b, tokens, width, device=device),
            "image_embeds": torch.randn(b, 145, 512, device=device),  # RAM's DAPE tokens
            "lq_up": torch.rand(b, 3, 8 * side, 8 * side, device=device)}  # fmt: skip
    loss = lambda: (net(z_t, 999, cond) - z_t).square().mean()  # noqa: E731
    return {"params": count(net), "latent": side,
            **timed_steps(train_step(net, loss, opts, device), opts, device)}  # fmt: skip


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def cache_vs_live(opts: dict, out: Path) -> dict:
    """``distsr.bench.cache`` at this size on this device, the cache made in process."""

    def cache(config: str, teacher: list[str], shards: Path, output: Path) -> Path:
        from distsr.teachers.cache_job import load_config

        cfg = load_config([str(CONFIG_DIR / f"{config}.yaml"), *(f"teacher.{o}" for o in teacher),
                           f"shards=[{shards}]", f"output={output}",
                           f"use_gpu={opts['device'] != 'cpu'}", "batch_size=4"])  # fmt: skip
        return Path(run_in_process(cfg)["cache_dir"])

    bench = {"size": opts["size"], "steps": opts["steps"], "repeats": opts["repeats"],
             "out": str(out / "cache_vs_live")}  # fmt: skip
    scaling = [f"scaling.use_gpu={opts['device'] != 'cpu'}",
               f"engine.precision={opts['precision']}"]  # fmt: skip
    if opts["size"] == "tiny":  # 32² crops, batch 1: the same code, a short run
        bench |= {"random_crops": 1}
        scaling.append(f"data.batch_size={opts['batch_size']}")
    parsed, overrides = bench_cache.parse([f"{k}={v}" for k, v in bench.items()])
    return bench_cache.bench_cache(parsed, [*overrides, *scaling], cache)


def infer(opts: dict, out: Path) -> dict:
    cfg = BenchInferConfig(size=opts["size"], lq_size=64 if opts["size"] == "full" else 16,
                           arms=["student", "teacher"], repeats=opts["repeats"],
                           device=opts["device"], output=str(out / "infer"))  # fmt: skip
    return bench_infer(cfg)


CHECKS = {"resshift_train": resshift_train, "seesr_train": seesr_train}


def gpu_check(opts: dict) -> dict:
    out, device = Path(opts["out"]).resolve(), torch.device(opts["device"])
    result = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "options": opts,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu"}  # fmt: skip
    checks = {
        **{n: (lambda c=c: c(opts, device)) for n, c in CHECKS.items()},
        "cache_vs_live": lambda: cache_vs_live(opts, out),
        "infer": lambda: infer(opts, out),
    }
    for name, check in checks.items():
        t0 = time.perf_counter()
        result[name] = check() | {"wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[gpu_check] {name}: done in {result[name]['wall_s']} s", flush=True)
    result["table"] = table(result)
    write_report(out, "gpu_check", result, result["table"])
    return result


def table(result: dict) -> str:
    rows = ["| check | number |", "|---|---|"]
    for name in CHECKS:
        r = result[name]
        rows += [f"| {name}: samples/s (batch {result['options']['batch_size']}) | "
                 f"{r['samples_per_s']:.3g} |",
                 f"| {name}: peak memory | {r['peak_mib']:.0f} MiB |",
                 f"| {name}: MFU ({r['device_kind']} {result['options']['precision']} peak) | "
                 f"{r['mfu']:.1%} |"]  # fmt: skip
    speedup = result["cache_vs_live"]["speedup"]["median"]
    rows.append(f"| TAD-SR step, cached / live | {speedup:.2f}x |")
    for arm in ("teacher", "student"):
        secs = result["infer"]["arms"][arm]["median"]
        rows.append(f"| {arm} seconds per 64 -> 256 image | {secs:.3g} |")
    return "\n".join(rows) + "\n"
