"""``python -m distsr.launch demo [key=value ...]``: the whole distsr pipeline on the photos bundled
with scikit-image/matplotlib, on CPU, on local Ray clusters.

Each stage is the command a user would type (printed before it runs), so the demo doubles as a
walk-through: make shards -> train a tiny ResShift teacher -> cache its 4-step outputs -> distil a
one-step TAD-SR student from the cache -> evaluate student vs teacher vs bicubic on held-out
photos -> ``<output_dir>/report.md``. Stages whose outputs exist are skipped, so a re-run resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distsr.config import CONFIG_DIR, apply_overrides, from_dict, load_yaml

ROOT = CONFIG_DIR.parent


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    crop_size: int = 32  # gt crops (lq = crop_size / 4)
    stride: int = 32
    teacher_steps: int = 300
    student_steps: int = 150
    workers: int = 2  # Ray Train workers per training stage
    eval_size: int = 128  # held-out photos are centre-cropped to this HR size
    seed: int = 0

    def validate(self):
        problems = []
        for key in ("crop_size", "teacher_steps", "student_steps", "workers", "eval_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.crop_size % 4:
            problems.append(("crop_size", "must be a multiple of 4 (x4 SR)"))
        return problems


def load_demo_config(overrides: list[str]) -> DemoConfig:
    data = apply_overrides(load_yaml(CONFIG_DIR / "demo.yaml"), overrides)
    cfg = from_dict(DemoConfig, data, source="configs/demo.yaml")
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    return cfg


def stage(title: str, cmd: list[str], done: Path) -> None:
    """Run one pipeline command unless ``done`` exists; its output streams to the console."""
    if done.exists():
        print(f"[demo] {title}: done already ({done})", flush=True)
        return
    print(f"\n[demo] {title}\n[demo] $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # private local clusters
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"[demo] {title}: {time.perf_counter() - t0:.0f} s", flush=True)


def commands(cfg: DemoConfig) -> list[tuple[str, list[str], Path]]:
    out = Path(cfg.output_dir)
    py = sys.executable
    shards, runs, cache = out / "shards", out / "runs", out / "cache"
    teacher_w = runs / "teacher" / "export" / "unet_ema.safetensors"
    student_w = runs / "student" / "export" / "student_ema.safetensors"
    common = [f"output_dir={runs}", f"data.shards=[{shards}]", f"seed={cfg.seed}",
              f"scaling.num_workers={cfg.workers}"]  # fmt: skip
    cache_dir = cache / "teacher"  # a stable link to cache/<fingerprint>, made after caching
    return [
        ("make shards from the bundled photos",
         [py, "jobs/make_shards.py", "inputs=[bundled]", f"output={shards}",
          f"crop_size={cfg.crop_size}", f"stride={cfg.stride}", f"seed={cfg.seed}"],
         shards / "manifest.json"),
        ("train the tiny ResShift teacher (4 steps)",
         [py, "-m", "distsr.launch", "resshift_tiny", "name=teacher", *common,
          f"engine.max_steps={cfg.teacher_steps}", f"data.gt_size={cfg.crop_size}"],
         teacher_w),
        ("cache the teacher's 4-step outputs",
         [py, "jobs/cache_teacher.py", "configs/cache_resshift_tiny.yaml",
          f"teacher.unet_checkpoint={teacher_w}", f"shards=[{shards}]", f"output={cache}",
          f"num_actors={cfg.workers}"],
         cache_dir),
        ("distil a one-step TAD-SR student from the cache",
         [py, "-m", "distsr.launch", "tadsr_tiny", "name=student", *common,
          f"method.teacher.unet_checkpoint={teacher_w}", f"method.cache_dir={cache_dir}",
          f"engine.max_steps={cfg.student_steps}"],
         student_w),
        ("evaluate student vs teacher vs bicubic on held-out photos",
         [py, "-m", "distsr.evaluate", "--gt", str(out / "eval_hr"), "--seed", str(cfg.seed),
          "--teacher", str(runs / "teacher"), "--student", str(runs / "student"),
          "--sampler", "deterministic", "--out", str(out)],
         out / "report.md"),
    ]  # fmt: skip


def link_cache(cfg: DemoConfig) -> None:
    """Point ``cache/teacher`` at ``cache/<fingerprint>`` (the one the job just wrote)."""
    cache = Path(cfg.output_dir) / "cache"
    link = cache / "teacher"
    if link.exists():
        return
    found = [p for p in cache.iterdir() if (p / "teacher.json").is_file()]
    if len(found) != 1:
        raise RuntimeError(f"expected one teacher cache in {cache}, found {found}")
    link.symlink_to(found[0].name)


def held_out_photos(folder: Path, size: int) -> Path:
    """Centre crops (size^2) of the bundled photos that no shard was made from, in ``folder``."""
    from PIL import Image

    from distsr.data.bundled import bundled_photos

    folder.mkdir(parents=True, exist_ok=True)
    for path in bundled_photos("eval"):
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h, s = img.width, img.height, size
            img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).save(
                folder / f"{path.stem}.png"
            )
    return folder


def main(overrides: list[str]) -> int:
    cfg = load_demo_config(overrides)
    t0 = time.perf_counter()
    for title, cmd, done in commands(cfg):
        if title.startswith("distil"):
            link_cache(cfg)
        if title.startswith("evaluate"):
            held_out_photos(Path(cfg.output_dir) / "eval_hr", cfg.eval_size)
        stage(title, cmd, done)
    report = Path(cfg.output_dir) / "report.md"
    summary = {"report": str(report), "seconds": round(time.perf_counter() - t0)}
    (Path(cfg.output_dir) / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[demo] finished in {summary['seconds']} s; report: {report}", flush=True)
    return 0
