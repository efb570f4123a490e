"""Typed configs of the training engine (DeepSpeed, schedule, checkpoints) and of the workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self):
        problems = []
        if self.lr <= 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(("betas", f"must be two numbers in [0, 1), got {self.betas}"))
        return problems


@dataclass
class SchedulerConfig:
    """Linear warm-up over ``warmup_steps``, then ``kind``; ``warmup_steps: 0`` with ``kind:
    constant`` keeps the base lr from the first step (e.g. TAD-SR's discriminator, whose lr the
    official code never adjusts, set per engine through ``Recipe.optimizer_overrides``)."""

    kind: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear: final lr = lr * min_lr_ratio
    step_every: int = 100_000  # step: multiply by gamma every step_every steps
    gamma: float = 0.1

    def validate(self):
        problems = []
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", f"must be >= 0, got {self.warmup_steps}"))
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"))
        return problems


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 2  # newest K checkpoints kept
    # Ray Train: save at once when a node of the run is about to be preempted (a drain notice)
    on_preemption: bool = True

    def validate(self):
        problems = []
        if self.every_steps < 1:
            problems.append(("every_steps", f"must be >= 1, got {self.every_steps}"))
        if self.keep < 1:
            problems.append(("keep", f"must be >= 1 (resume needs one), got {self.keep}"))
        return problems


@dataclass
class EngineConfig:
    max_steps: int = 1000  # optimizer steps (after gradient accumulation)
    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: float | None = 1.0  # max global gradient norm; 0 or null: no clipping
    grad_accum: int = 1
    ema_decay: float | None = None  # EMA of the trainable weights the recipe names
    log_every: int = 10
    preview_every: int = 0  # sample-image grids (TensorBoard + run_dir/previews/); 0 = never
    max_nonfinite_in_row: int = 10  # stop after this many NaN/inf losses in a row
    min_free_gb: float = 1.0  # refuse to start when the output folder's disk has less free
    tensorboard: bool = True
    # speed options, off by default: on CPU compile pays only in long runs and channels_last
    # not at all (BENCHMARKS.md, torch.compile and channels_last); GPU: jobs/bench_compile.py
    compile: bool = False  # torch.compile each engine's module in place
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation)
    channels_last: bool = False  # each engine's module computes in channels_last format
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self):
        problems = []
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"))
        if self.max_steps < 1:
            problems.append(("max_steps", f"must be >= 1, got {self.max_steps}"))
        if self.grad_accum < 1:
            problems.append(("grad_accum", f"must be >= 1, got {self.grad_accum}"))
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append(("grad_clip", f"must be >= 0, got {self.grad_clip}"))
        if self.max_nonfinite_in_row < 1:
            problems.append(("max_nonfinite_in_row", "must be >= 1"))
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(("ema_decay", f"must be in (0, 1), got {self.ema_decay}"))
        return problems


@dataclass
class ScalingConfig:
    """Where the per-worker loop runs: Ray Train workers, or in-process (``ray: false``).
    ``num_workers: [min, max]`` is an elastic group (Ray Train's elastic scaling): it starts
    with as many workers as the cluster holds (at least ``min``), goes on with fewer when a
    node is lost, and grows back (checked every ``resize_interval_s``) when nodes return; every
    change of size restarts the workers from the newest checkpoint (``engine/elastic.py``)."""

    ray: bool = True
    num_workers: int | list[int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # Ray Train restarts from the last checkpoint this many times
    resize_interval_s: float = 60.0  # elastic: how often Ray looks for room to grow
    # how long a (re)start waits for the workers it placed before it tries the size the cluster
    # has (Ray Train's worker-group start timeout; null: Ray's 60 s). After a node loss Ray's
    # view of the cluster may still hold the lost node for up to 20 s, so the first restart of
    # an elastic run may ask for a worker too many and wait this long.
    start_timeout_s: float | None = None

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def validate(self):
        problems = []
        n = self.num_workers
        if isinstance(n, list) and len(n) != 2:
            problems.append(("num_workers", f"an int or [min, max], got {n}"))
        elif not 1 <= self.min_workers <= self.max_workers:
            problems.append(("num_workers", f"must be >= 1 (and min <= max), got {n}"))
        elif not self.ray and self.max_workers != 1:
            problems.append(("num_workers", "in-process runs (ray: false) have exactly 1 worker"))
        if self.start_timeout_s is not None and self.start_timeout_s <= 0:
            problems.append(("start_timeout_s", f"must be > 0, got {self.start_timeout_s}"))
        if self.resize_interval_s < 0:
            problems.append(("resize_interval_s", f"must be >= 0, got {self.resize_interval_s}"))
        return problems


@dataclass
class DebugConfig:
    """Fault injection for tests: rank ``fail_rank`` exits hard once at ``fail_at_step``."""

    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_mode: Literal["exit", "sigkill"] = "exit"
    fail_in_checkpoint: bool = False  # die inside the checkpoint of fail_at_step instead
    nonfinite_at_steps: list[int] = field(default_factory=list)  # NaN loss at these steps
    nonfinite_rank: int = 0
    nonfinite_repeat: int = 1  # consecutive NaN micro-batches injected at each of those steps
