"""Efficiency of SR networks in the style of FKdiff's Table 2 (paper 000): parameters, MACs,
runtime and peak memory, and the FKdiff table itself (teacher / FASRer_L / FASRer_S pipelines).

* MACs: ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2, counted on the meta device (no
  compute, so the paper's 256 x 256 input costs nothing). Torch counts matmuls and convolutions;
  FFTs are added with the usual radix-2 estimate (complex: 5 N log2 N FLOPs per transform of N
  points, real-input or real-output: half). Element-wise work (norms, softmax, the spectrum
  products) is not counted, as in the papers' tables.
* Runtime: one warm-up call each, then ``repeats`` rounds calling every network once in turn
  (one process, the device asked for); the median seconds, and the median (min-max) over the
  rounds of the ratio to the first row (the teacher). On a shared CPU machine ``clock=process``
  (this process's CPU seconds) with ``threads=1`` gives ratios that other users barely move.
* Peak memory: ``distsr.evaluate.memory.peak_meter`` (CUDA allocator peak, or the CPU call's
  resident-set growth).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distsr.evaluate.memory import peak_meter
from distsr.models.fkdiff import (
    CFE,
    CFE_PAPER,
    CFE_TINY,
    FASRER_L,
    FASRER_L_TINY,
    FASRER_S,
    FASRER_S_TINY,
    PRIOR_PAPER,
    PRIOR_TINY,
    TEACHER_PAPER,
    TEACHER_TINY,
    FASRer,
    FKdiffTeacherNet,
    PriorDenoiser,
    PriorSchedule,
)
from distsr.teachers.fkdiff import PriorNets

# --- generic measures ------------------------------------------------------------------------


def count_params(*modules: nn.Module) -> int:
    """Parameters of the modules together (a parameter shared between them counted once)."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _fft_points(shape, dims) -> tuple[int, int]:
    n = math.prod(shape[d] for d in dims)
    return n, math.prod(shape) // max(n, 1)


def _fft_r2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n, batch = _fft_points(x_shape, dim)
    return int(batch * 2.5 * n * math.log2(max(n, 2)))


def _fft_c2r(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n, batch = _fft_points(out_shape, dim)
    return int(batch * 2.5 * n * math.log2(max(n, 2)))


def _fft_c2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    n, batch = _fft_points(x_shape, dim)
    return int(batch * 5 * n * math.log2(max(n, 2)))


FFT_FLOPS = {
    torch.ops.aten._fft_r2c: _fft_r2c,
    torch.ops.aten._fft_c2r: _fft_c2r,
    torch.ops.aten._fft_c2c: _fft_c2c,
}


def count_macs(fn: Callable[[], object], fft: bool = True) -> int:
    """Multiply-accumulates of ``fn()`` (counted FLOPs / 2), FFTs included when ``fft``."""
    mapping = FFT_FLOPS if fft else None
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def time_calls(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each ``fn``: one warm-up call each, then ``repeats`` rounds that call
    every ``fn`` once in turn (so a change of machine load hits all alike). ``clock``:
    ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU seconds, which other
    processes on a shared CPU machine barely change). Returns ``{name: [seconds per round]}``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync()
                start = clock()
                fn()
                sync()
                times[name].append(clock() - start)
    return times


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    meter = peak_meter(device)
    with torch.no_grad():
        start = meter.start()
        fn()
        return meter.stop(start)


# --- FKdiff's Table 2 ----------------------------------------------------------------------

# paper 000, Table 2 (256 x 256 input, RTX 3090): params (M), MACs (T), runtime (s), memory (GB)
PAPER_TABLE2 = {"DiffIR": (26.57, 0.70, 0.1981, 4.86), "FKdiff": (13.76, 0.53, 0.2106, 2.79)}


@dataclass
class EfficiencyConfig:
    """``jobs/bench_fkdiff_efficiency.py`` keys."""

    size: int = 64  # lq side for runtime and memory (sr is 4x)
    mac_size: int = 256  # lq side for MACs (the paper's 256 x 256), counted without compute
    repeats: int = 3
    device: str = "cpu"
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0
    nets: list[str] = field(default_factory=lambda: ["teacher", "fasrer_l", "fasrer_s"])
    preset: Literal["paper", "tiny"] = "paper"  # tiny: the test presets (a quick check)
    clock: Literal["wall", "process"] = "wall"  # process: CPU seconds of this process (CPU only)

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for key in ("size", "mac_size", "repeats"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.clock == "process" and self.device != "cpu":
            problems.append(("clock", "process CPU time measures only device=cpu"))
        bad = sorted(set(self.nets) - set(NETS))
        if bad:
            problems.append(("nets", f"unknown {bad}; valid: {list(NETS)}"))
        return problems


NETS = {
    "teacher": "teacher restorer (DiffIR-S1 G) + CFE_R + denoiser = DiffIR-S2",
    "fasrer_l": "FASRer_L + CFE_R + denoiser",
    "fasrer_s": "FASRer_S + CFE_R + denoiser",
}


PRESETS = {
    "paper": {"teacher": TEACHER_PAPER, "fasrer_l": FASRER_L, "fasrer_s": FASRER_S,
              "cfe": CFE_PAPER, "prior": PRIOR_PAPER},
    "tiny": {"teacher": TEACHER_TINY, "fasrer_l": FASRER_L_TINY, "fasrer_s": FASRER_S_TINY,
             "cfe": CFE_TINY, "prior": PRIOR_TINY},
}  # fmt: skip


class FKdiffPipeline(nn.Module):
    """FKdiff inference (Fig. 1c + Sec. 3.2): D = CFE_R(lq), Z_hat by the T-step prior sampler
    from seeded noise, sr = restorer(lq, Z_hat)."""

    def __init__(self, restorer: nn.Module, prior: PriorNets, schedule: PriorSchedule):
        super().__init__()
        self.restorer, self.prior, self.schedule = restorer, prior, schedule

    def noises(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        shape = (batch, self.schedule.dim)
        return [torch.randn(shape, generator=generator) for _ in range(self.schedule.timesteps + 1)]

    def forward(self, lq: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
        return self.restorer(lq, self.prior.sample(lq, noises, self.schedule))[0]


def fkdiff_pipelines(names: list[str] | None = None, preset: str = "paper") -> dict[str, nn.Module]:
    """The paper (or tiny) configurations as inference pipelines (random weights: the cost does
    not depend on the values), each with its own CFE_R and prior denoiser."""
    cfgs = PRESETS[preset]
    restorers = {
        "teacher": lambda: FKdiffTeacherNet(cfgs["teacher"]),
        "fasrer_l": lambda: FASRer(cfgs["fasrer_l"]),
        "fasrer_s": lambda: FASRer(cfgs["fasrer_s"]),
    }
    return {
        name: FKdiffPipeline(
            restorers[name](), PriorNets(cfgs["cfe"], cfgs["prior"]), PriorSchedule(cfgs["prior"])
        ).eval()
        for name in names or list(NETS)
    }


def fkdiff_param_counts() -> dict[str, int]:
    """Parameters of every FKdiff part in the paper configurations (built on the meta device)."""
    with torch.device("meta"):
        parts = {
            "teacher restorer (DiffIR-S1 G)": FKdiffTeacherNet(TEACHER_PAPER),
            "CFE_D": CFE("D", CFE_PAPER),
            "CFE_R": CFE("R", CFE_PAPER),
            "prior denoiser": PriorDenoiser(PRIOR_PAPER),
            "FASRer_L": FASRer(FASRER_L),
            "FASRer_S": FASRer(FASRER_S),
        }
    counts = {name: count_params(m) for name, m in parts.items()}
    extra = counts["CFE_R"] + counts["prior denoiser"]
    counts["DiffIR-S2 (teacher + CFE_R + denoiser)"] = (
        counts["teacher restorer (DiffIR-S1 G)"] + extra
    )
    counts["FKdiff-L (FASRer_L + CFE_R + denoiser)"] = counts["FASRer_L"] + extra
    counts["FKdiff-S (FASRer_S + CFE_R + denoiser)"] = counts["FASRer_S"] + extra
    return counts


def fasrer_width_for(params: float) -> int:
    """The FASRer_S width (a multiple of 8) whose FKdiff-S pipeline comes closest to ``params``
    (the paper gives no width; this says what width its 13.76 M would imply)."""

    def total(dim: int) -> int:
        with torch.device("meta"):
            net = FASRer(replace(FASRER_S, dim=dim))
            return count_params(net, CFE("R", CFE_PAPER), PriorDenoiser(PRIOR_PAPER))

    return min(range(8, 257, 8), key=lambda dim: abs(total(dim) - params))


def _cost(pipe: nn.Module, size: int) -> dict:
    """Params and MACs of one meta-device pipeline at lq ``size`` x ``size``."""
    lq = torch.empty(1, 3, size, size, device="meta")
    noises = [torch.empty(1, pipe.schedule.dim, device="meta")] * (pipe.schedule.timesteps + 1)
    return {"params": count_params(pipe), "restorer_params": count_params(pipe.restorer),
            "macs": count_macs(lambda: pipe(lq, noises)),
            "macs_no_fft": count_macs(lambda: pipe(lq, noises), fft=False)}  # fmt: skip


def fkdiff_table(cfg: EfficiencyConfig) -> list[dict]:
    """One row per pipeline: params, MACs at ``mac_size``, runtime (median over the rounds) and
    peak memory at ``size``; the runtime also as a ratio to the first row, per round."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with torch.device("meta"):
        meta = fkdiff_pipelines(cfg.nets, cfg.preset)
    rows = [{"name": name, "what": NETS[name], **_cost(pipe, cfg.mac_size)}
            for name, pipe in meta.items()]  # fmt: skip
    torch.manual_seed(cfg.seed)
    pipes = {n: p.to(device) for n, p in fkdiff_pipelines(cfg.nets, cfg.preset).items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    lq = torch.rand(1, 3, cfg.size, cfg.size, generator=gen).to(device)
    noises = [n.to(device) for n in pipes[cfg.nets[0]].noises(1, gen)]
    calls = {name: (lambda p=pipe: p(lq, noises)) for name, pipe in pipes.items()}
    clock = time.process_time if cfg.clock == "process" else time.perf_counter
    times = time_calls(calls, cfg.repeats, device, clock)
    first = times[rows[0]["name"]]
    for row in rows:
        own = times[row["name"]]
        ratios = [a / b for a, b in zip(own, first)]
        row["runtime_s"], row["runtime_ratio"] = statistics.median(own), statistics.median(ratios)
        row["ratio_range"] = (min(ratios), max(ratios))
        row["peak_mib"] = peak_mib(calls[row["name"]], device)
    return rows


def markdown(rows: list[dict], cfg: EfficiencyConfig, counts: dict[str, int]) -> str:
    """The Table-2-style table, the paper's rows, and every part's parameter count."""
    n, s = cfg.mac_size, cfg.size
    lines = [
        f"| pipeline | params (M) | restorer (M) | MACs (T) at lq {n}x{n} "
        f"(w/o FFT) | runtime (s) at lq {s}x{s} on {cfg.device} ({cfg.clock} clock) | vs teacher "
        "| peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['what']} | {r['params'] / 1e6:.2f} | {r['restorer_params'] / 1e6:.2f} | "
            f"{r['macs'] / 1e12:.3f} ({r['macs_no_fft'] / 1e12:.3f}) | {r['runtime_s']:.3f} | "
            f"{r['runtime_ratio']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | "
            f"{mem} |"
        )
    lines += ["", "Paper (Table 2, 256x256 input, RTX 3090):", ""]
    lines += [
        "| method | params (M) | MACs (T) | runtime (s) | GPU memory (GB) |",
        "|" + "---|" * 5,
    ]
    lines += [f"| {k} | {p} | {m} | {t} | {g} |" for k, (p, m, t, g) in PAPER_TABLE2.items()]
    lines += ["", "| part (paper configuration) | params (M) |", "|---|---|"]
    lines += [f"| {k} | {v / 1e6:.2f} |" for k, v in counts.items()]
    return "\n".join(lines) + "\n"
