"""Training progress: console line with ETA, ``metrics.jsonl`` and TensorBoard (rank 0).

``metrics.jsonl`` is the run's history: a resumed run appends the steps after its checkpoint,
so steps a crashed attempt logged past that checkpoint appear twice (equal, when resume is
exact). TensorBoard shows one curve: a resumed writer purges the events past the checkpoint."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import torch


class MetricLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, max_steps: int,
                 resumed_at: int = 0):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self.jsonl = None
        self.window: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self.steps_in_window = 0
        self.samples_in_window = 0
        self.data_wait = 0.0
        self.eta_s: float | None = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events a crashed run wrote past the checkpoint it resumes
                self.writer = SummaryWriter(
                    str(run_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None
                )

    def timed(self, iterable):
        """Yield from ``iterable``, adding the time spent waiting for each item to ``data_wait``."""
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - t0
            yield item

    def accumulate(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.window.setdefault(key, []).append(float(value))

    def step_done(self, samples: int) -> None:
        self.steps_in_window += 1
        self.samples_in_window += samples

    def flush(self, step: int, extra: dict | None = None) -> dict:
        """Average the window, print one line, write jsonl/TensorBoard; returns the record."""
        elapsed = time.perf_counter() - self.t0
        n = max(self.steps_in_window, 1)
        record = {k: sum(v) / len(v) for k, v in self.window.items()}
        record.update(
            step=step,
            step_time=elapsed / n,
            samples_per_s=self.samples_in_window / max(elapsed, 1e-9),
            data_wait=self.data_wait / n,
            **(extra or {}),
        )
        self.eta_s = record["step_time"] * (self.max_steps - step)
        eta = timedelta(seconds=int(self.eta_s))
        if self.enabled:
            scalars = " | ".join(
                f"{k} {v:.4g}"
                for k, v in record.items()
                if k not in ("step",) and isinstance(v, float)
            )
            print(f"[distsr] step {step}/{self.max_steps} | {scalars} | ETA {eta}", flush=True)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.writer is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float):
                        self.writer.add_scalar(key, value, step)
                self.writer.flush()
        self.window.clear()
        self.t0 = time.perf_counter()
        self.steps_in_window = self.samples_in_window = 0
        self.data_wait = 0.0
        return record

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()

    def image_grid(self, step: int, columns: dict) -> None:
        """One row per sample, one column per entry of ``columns``: TensorBoard + a PNG."""
        if not self.enabled or not columns:
            return
        from torchvision.utils import make_grid, save_image

        stacked = torch.stack([c.detach().float().cpu() for c in columns.values()], dim=1)
        grid = make_grid(stacked.flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)
        folder = self.run_dir / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"step_{step:08d}.png")
        if self.writer is not None:
            self.writer.add_image("preview/" + " | ".join(columns), grid, step)
