"""What ``engine.compile`` and ``engine.channels_last`` give: training and inference steps per
second of a run config's student, with and without each, side by side in one process.

Every arm is a real ``Trainer`` (recipe + DeepSpeed engines, in-process, world size 1) built
from the same run config with its options on; all arms train on the same micro-batches, read
once from shards of the bundled photos. After ``warmup`` untimed steps (compilation happens
there and is reported apart), ``repeats`` rounds time ``steps`` training micro-steps
(``Trainer.micro_step``: forward, backward, optimizer step of every update) and ``steps``
inference forwards (the student module in eval mode under ``no_grad``, on the inputs it got in
training) per arm. The arms alternate step by step, in an order rotating from step to step, so
a change of the machine's load hits every arm alike. ``jobs/bench_compile.py`` is the command
line.
"""

from __future__ import annotations

import dataclasses
import itertools
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distsr.bench.cli import write_report
from distsr.bench.stats import spread_text

ARMS = {  # arm -> engine options
    "plain": {},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "compile+channels_last": {"compile": True, "channels_last": True},
}


@dataclass
class BenchCompileConfig:
    output: str = "runs/bench_compile"
    config: str = "resshift_tiny"  # the run config (name in configs/ or YAML) whose student runs
    overrides: list[str] = field(default_factory=list)  # key=value changes of that run config
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    compile_backend: str = "inductor"
    steps: int = 20  # timed training micro-steps and inference forwards per arm and round
    warmup: int = 3  # untimed first steps of each arm (compilation)
    repeats: int = 3
    crop_size: int = 32  # gt crops of the shards (lq = crop_size / scale)
    seed: int = 0

    def validate(self):
        problems = []
        bad = [a for a in self.arms if a not in ARMS]
        if bad or "plain" not in self.arms:
            problems.append(("arms", f"choose from {list(ARMS)} with plain, got {self.arms}"))
        for key in ("steps", "warmup", "repeats", "crop_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        return problems


def run_config(cfg: BenchCompileConfig, shards: Path, arm: str):
    """The run config of one arm: in-process, ZeRO-0, no EMA, logging and checkpoints off."""
    from distsr.runconfig import load_run_config

    engine = {"compile_backend": cfg.compile_backend, **ARMS[arm]}
    return load_run_config(cfg.config, [
        f"name=bench_{arm.replace('+', '_')}", f"output_dir={Path(cfg.output) / 'runs'}",
        f"data.shards=[{shards}]", "data.num_workers=0", "scaling.ray=false",
        "scaling.num_workers=1", "engine.zero_stage=0", "engine.ema_decay=null",
        "engine.tensorboard=false", "engine.preview_every=0", f"seed={cfg.seed}",
        *cfg.overrides, *(f"engine.{k}={str(v).lower()}" for k, v in engine.items()),
    ])  # fmt: skip


def make_data(cfg: BenchCompileConfig) -> Path:
    from distsr.config import from_dict
    from distsr.data.config import ShardsConfig
    from distsr.data.shards import make_shards

    shards = Path(cfg.output) / "shards"
    if not (shards / "manifest.json").is_file():
        make_shards(from_dict(ShardsConfig, {"inputs": ["bundled"], "output": str(shards),
                                             "crop_size": cfg.crop_size, "stride": cfg.crop_size,
                                             "seed": cfg.seed}))  # fmt: skip
    return shards


class Arm:
    """One arm's trainer, its student module and that module's recorded inference inputs."""

    def __init__(self, run_cfg):
        from distsr.engine.checkpoint import LocalStore
        from distsr.engine.context import init_in_process
        from distsr.engine.loop import Trainer
        from distsr.engine.metrics import MetricLogger

        self.trainer = Trainer(run_cfg, init_in_process(), LocalStore(run_cfg.run_dir, keep=1))
        self.trainer.logger = MetricLogger(run_cfg.run_dir, enabled=False, tensorboard=False,
                                           max_steps=run_cfg.engine.max_steps)  # fmt: skip
        self.name, engine = list(self.trainer.engines.items())[-1]  # the student: last engine
        self.student = engine.module
        self.inputs = None  # on the engine, outside the compiled module: once, then removed
        self._hook = engine.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        self.inputs = _detached((args, kwargs))
        self._hook.remove()

    def train(self, batches: list[dict]) -> float:
        """Seconds for one training micro-step per batch."""
        self.student.train()
        t0 = time.perf_counter()
        for batch in batches:
            if not self.trainer.micro_step(batch):
                raise RuntimeError("non-finite loss while benchmarking")
        return time.perf_counter() - t0

    def infer(self, n: int) -> float:
        """Seconds for ``n`` student forwards on the recorded inputs (eval, no_grad)."""
        args, kwargs = self.inputs
        self.student.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                self.student(*args, **kwargs)
        return time.perf_counter() - t0


def _detached(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached(v) for v in value)
    return value


def take_batches(arm: Arm, n: int) -> list[dict]:
    loader = arm.trainer.make_loader(n)
    return [{k: v for k, v in b.items() if k != "skipped"} for b in itertools.islice(loader, n)]


def bench_compile(cfg: BenchCompileConfig) -> dict:
    """Build every arm, warm it up, time interleaved rounds; write ``bench_compile.{json,md}``."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    shards = make_data(cfg)
    arms = {name: Arm(run_config(cfg, shards, name)) for name in cfg.arms}
    batches = take_batches(arms["plain"], cfg.warmup + cfg.steps)
    warm, timed = batches[: cfg.warmup], batches[cfg.warmup :]
    rows = {name: {"train": [], "infer": []} for name in arms}
    for name, arm in arms.items():
        t0 = time.perf_counter()
        for batch in warm:  # as the timed rounds: train and eval forwards alternate
            arm.train([batch])
            arm.infer(1)
        rows[name]["warmup_s"] = time.perf_counter() - t0
    for r in range(cfg.repeats):
        spent = {name: {"train": 0.0, "infer": 0.0} for name in arms}
        for i, batch in enumerate(timed):  # arms alternate step by step: load drift hits all
            order = list(arms)[(r + i) % len(arms) :] + list(arms)[: (r + i) % len(arms)]
            for name in order:
                spent[name]["train"] += arms[name].train([batch])
            for name in order:
                spent[name]["infer"] += arms[name].infer(1)
        for name, seconds in spent.items():
            rows[name]["train"].append(len(timed) / seconds["train"])
            rows[name]["infer"].append(len(timed) / seconds["infer"])
    summary = summarize(cfg, arms["plain"], rows)
    write_report(out, "bench_compile", summary, summary["table"])
    return summary


def summarize(cfg: BenchCompileConfig, plain: Arm, rows: dict) -> dict:
    base = rows["plain"]
    lines = ["| arm | train steps/s | inference steps/s | train vs plain | inference vs plain |"
             " warm-up s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        ratios = {k: [a / b for a, b in zip(row[k], base[k], strict=True)] for k in row
                  if k != "warmup_s"}  # fmt: skip
        row["train_vs_plain"], row["infer_vs_plain"] = ratios["train"], ratios["infer"]
        train, infer = (statistics.median(ratios[k]) for k in ("train", "infer"))
        lines.append(f"| {name} | {spread_text(row['train'])} | {spread_text(row['infer'])} | "
                     f"{train:.2f}x | {infer:.2f}x | {row['warmup_s']:.1f} |")  # fmt: skip
    run = plain.trainer.cfg
    params = sum(p.numel() for p in plain.student.parameters())
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, device {plain.trainer.ctx.device}")  # fmt: skip
    return {
        "table": "\n".join(lines) + "\n",
        "arms": rows,
        "config": dataclasses.asdict(cfg),
        "student": {
            "engine": plain.name,
            "recipe": run.recipe,
            "parameters": params,
            "batch_size": run.data.batch_size,
            "precision": run.engine.precision,
        },
        "machine": machine,
    }
