"""Inference benchmark: seconds per image of the one-step student vs the multi-step teacher.

Both are ResShift networks with random weights (speed does not depend on the weights): at
``size="full"`` the released real-SR x4 configuration (the 118.6 M-parameter ``UNetModelSwin`` of
``RESSHIFT_REALSR_X4_KWARGS``, the VQ-f4 first stage, 15 steps, the official stochastic sampler),
at ``size="tiny"`` the pixel-space teacher of ``configs/tadsr_tiny.yaml`` (4 steps). The student
is the teacher's UNet called once (TAD-SR: the student starts as a copy of the teacher), so the
ratio is the step count plus what both share (encoding lq, decoding z0).

The input is a real photo (scikit-image's chelsea, centre crop of ``4 * lq_size``) downscaled
by antialiased bicubic to ``lq_size``. Every arm (``student``, ``teacher``, and ``*_tiled``:
tiled upscaling with ``tile``/``overlap`` lq pixels) is called once untimed, under torch's
flop counter, then the arms are timed in turn, ``repeats`` rounds, interleaved, so the machine's
drift hits them alike. The report gives the median and range of seconds per image, the peak
memory of a call (``distsr.evaluate.memory``), the FLOPs of a call, and the teacher/student
ratio per round next to its FLOP bound and the paper's 11.8x (TAD-SR, 0.682 s vs 0.058 s per
image on an A100). ``jobs/bench_infer.py`` is the command line.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distsr.bench.cli import torch_threads, write_report
from distsr.bench.stats import spread
from distsr.config import CONFIG_DIR, from_dict, load_yaml
from distsr.data.degradation import bicubic_downscale
from distsr.evaluate.memory import peak_meter
from distsr.inference.predictors import ResShiftMultiStep, ResShiftOneStep
from distsr.inference.tiling import upscale_tiled
from distsr.models.autoencoder import PixelAutoencoder, VQAutoencoder
from distsr.models.resshift import ResShift, ResShiftSpec

SIZES = ("tiny", "full")
ARMS = ("student", "teacher", "student_tiled", "teacher_tiled")
PAPER = {"student_s": 0.058, "teacher_s": 0.682, "ratio": 11.8, "device": "A100"}  # TAD-SR


@dataclass
class BenchInferConfig:
    size: str = "tiny"
    lq_size: int = 64  # lq side; sr is 4x
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    tile: int = 32  # lq pixels per tile of the *_tiled arms
    overlap: int = 8
    repeats: int = 3
    device: str = "cpu"
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    seed: int = 0
    output: str = "runs/bench_infer"

    def validate(self):
        problems = []
        if self.size not in SIZES:
            problems.append(("size", f"choose from {list(SIZES)}, got {self.size!r}"))
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            problems.append(("arms", f"choose from {list(ARMS)}, got {list(self.arms)}"))
        for key in ("lq_size", "tile", "repeats"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.threads < 0:
            problems.append(("threads", "must be >= 0"))
        if not 0 <= self.overlap < self.tile:
            problems.append(("overlap", "must be >= 0 and smaller than tile"))
        return problems


def build_model(size: str, seed: int = 0) -> tuple[ResShift, str]:
    """(a random-weight ResShift of ``size``, the teacher's sampler)."""
    torch.manual_seed(seed)
    if size == "full":  # the released real-SR x4 defaults of ResShiftSpec
        from distsr.models.vq import build_vq_f4

        return ResShift(ResShiftSpec(), autoencoder=VQAutoencoder(vq=build_vq_f4())), "stochastic"
    teacher = load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]
    keys = ("unet", "schedule", "scale")
    spec = from_dict(ResShiftSpec, {k: teacher[k] for k in keys}, source="tadsr_tiny.yaml")
    return ResShift(spec, autoencoder=PixelAutoencoder()), teacher["sampler"]


def photo_lq(lq_size: int) -> torch.Tensor:
    """[1, 3, lq_size, lq_size] in [0, 1]: a centre crop of a real photo, bicubic x4 down
    (a photo smaller than the crop is tiled by reflection first)."""
    import numpy as np
    import skimage.data

    gt, side = skimage.data.chelsea(), 4 * lq_size
    pad = [(0, max(0, side - n)) for n in gt.shape[:2]] + [(0, 0)]
    gt = np.pad(gt, pad, mode="symmetric")
    top, left = (gt.shape[0] - side) // 2, (gt.shape[1] - side) // 2
    lq = bicubic_downscale(gt[top : top + side, left : left + side], 4)
    return torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255


def arm_callers(model: ResShift, sampler: str, cfg: BenchInferConfig) -> dict:
    student = ResShiftOneStep(model, seed=cfg.seed)
    teacher = ResShiftMultiStep(model, seed=cfg.seed, sampler=sampler)
    nets = {"student": student, "teacher": teacher}

    def tiled(fn):
        return lambda lq: upscale_tiled(fn, lq, fn.scale, cfg.tile, cfg.overlap)

    calls = dict(nets) | {f"{name}_tiled": tiled(fn) for name, fn in nets.items()}
    return {arm: calls[arm] for arm in cfg.arms}


def time_call(fn, lq: torch.Tensor, meter) -> tuple[float, float | None]:
    """(seconds, peak MiB) of one call; CUDA work is synchronised on both sides."""
    cuda = lq.is_cuda
    mark = meter.start()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(lq)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, meter.stop(mark)


@torch.no_grad()
def bench_infer(cfg: BenchInferConfig) -> dict:
    # on a shared machine 1 thread avoids OpenMP barriers spinning on busy cores
    with torch_threads(cfg.threads):
        return run_arms(cfg)


def run_arms(cfg: BenchInferConfig) -> dict:
    device = torch.device(cfg.device)
    model, sampler = build_model(cfg.size, cfg.seed)
    model = model.to(device).eval()
    lq = photo_lq(cfg.lq_size).to(device)
    calls, meter = arm_callers(model, sampler, cfg), peak_meter(device)
    seconds = {arm: [] for arm in calls}
    peaks = {arm: 0.0 for arm in calls}
    flops = {}
    for arm, fn in calls.items():  # untimed warm-up (allocator, thread pools), FLOPs counted
        with FlopCounterMode(display=False) as counter:
            fn(lq)
        flops[arm] = float(counter.get_total_flops())
    for _ in range(cfg.repeats):
        for arm, fn in calls.items():
            secs, peak = time_call(fn, lq, meter)
            seconds[arm].append(secs)
            peaks[arm] = max(peaks[arm], peak or 0.0)
    return report(cfg, model, sampler, seconds, peaks, flops, meter.kind)


def report(cfg, model: ResShift, sampler, seconds: dict, peaks: dict, flops: dict, peak_kind: str):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {
        "config": asdict(cfg),
        "machine": machine(cfg.device),
        "date": time.strftime("%Y-%m-%d"),
        "unet_params": count(model.unet),
        "autoencoder_params": count(model.autoencoder),
        "teacher_steps": model.diffusion.num_timesteps,
        "teacher_sampler": sampler,
        "lq": [cfg.lq_size, cfg.lq_size],
        "sr": [4 * cfg.lq_size, 4 * cfg.lq_size],
        "peak_memory_kind": peak_kind,
        "arms": {
            a: {"seconds": s, **spread(s), "peak_mib": peaks[a], "flops": flops[a]}
            for a, s in seconds.items()
        },
        "paper": PAPER,
    }
    for suffix in ("", "_tiled"):
        student, teacher = seconds.get(f"student{suffix}"), seconds.get(f"teacher{suffix}")
        if student and teacher:
            ratios = [t / s for t, s in zip(teacher, student)]  # per interleaved round
            flop_bound = flops[f"teacher{suffix}"] / flops[f"student{suffix}"]
            result[f"ratio{suffix}"] = spread(ratios) | {"flop_bound": flop_bound}
    result["table"] = table(result)
    write_report(Path(cfg.output), "bench_infer", result, result["table"])
    return result


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {threads} torch threads, CPU"


def table(result: dict) -> str:
    rows = ["| arm | s / image: median (min-max) | images/s | peak MiB | GFLOPs |",
            "|---|---|---|---|---|"]  # fmt: skip
    for arm, r in result["arms"].items():
        rows.append(
            f"| {arm} | {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) "
            f"| {1 / r['median']:.2f} | {r['peak_mib']:.0f} | {r['flops'] / 1e9:.1f} |"
        )
    for key in ("ratio", "ratio_tiled"):
        if key in result:
            r = result[key]
            rows.append(
                f"| **teacher / student{key[5:]}** | **{r['median']:.2f}x** "
                f"({r['min']:.2f}-{r['max']:.2f}) | paper {PAPER['ratio']}x | "
                f"| bound {r['flop_bound']:.2f}x |"
            )
    return "\n".join(rows) + "\n"
