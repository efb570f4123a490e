"""``python -m distsr.launch demo [key=value ...]``: the whole distsr pipeline on the photos bundled
with scikit-image/matplotlib, on CPU, on local Ray clusters.

Each stage is the command a user would type (printed before it runs), so the demo doubles as a
walk-through: make shards -> train a tiny ResShift teacher -> cache its 4-step outputs -> distil a
one-step TAD-SR student from the cache -> cache a real pretrained teacher (SRMDNF x4 of the
``[teachers]`` wheels) -> distil a small single-pass student from it with DTKD
(``configs/dtkd_srmdnf.yaml``) -> evaluate both students vs the ResShift teacher vs bicubic on
held-out photos -> ``<output_dir>/report.md``. Stages whose outputs exist are skipped, so a
re-run resumes. Without the ncnn wheels the two KD stages are left out (with a note).
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
    kd_teacher: str = "srmdnf-x4"  # an installed ncnn model (models.ncnn.find_ncnn_models)
    kd_steps: int = 1000  # DTKD student steps (configs/dtkd_srmdnf.yaml)

    def validate(self):
        problems = []
        keys = ("crop_size", "teacher_steps", "student_steps", "workers", "eval_size", "kd_steps")
        for key in keys:
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


def kd_teacher_file(cfg: DemoConfig) -> Path | None:
    """The ``.param`` of the KD stage's pretrained teacher, None when its wheel is missing."""
    from distsr.models.ncnn import find_ncnn_models

    found = find_ncnn_models().get(cfg.kd_teacher)
    return None if found is None else found.param


def kd_commands(cfg: DemoConfig, param: Path) -> list[tuple[str, list[str], Path]]:
    """Cache the pretrained teacher's outputs, then distil the DTKD student from the cache."""
    out, py = Path(cfg.output_dir), sys.executable
    runs, shards = out / "runs", out / "shards"
    cache_dir = out / "cache_kd" / "teacher"  # a stable link, as cache/teacher
    return [
        (f"cache the pretrained {cfg.kd_teacher} teacher (ncnn wheel)",
         [py, "jobs/cache_teacher.py", "teacher.kind=regression",
          f"teacher.model_files=[{param}]", "decode=true", f"shards=[{shards}]",
          f"output={out / 'cache_kd'}", f"num_actors={cfg.workers}"],
         cache_dir),
        (f"distil a small student from {cfg.kd_teacher} (DTKD)",
         [py, "-m", "distsr.launch", "dtkd_srmdnf", "name=kd_student", f"output_dir={runs}",
          f"data.shards=[{shards}]", f"seed={cfg.seed}", f"scaling.num_workers={cfg.workers}",
          f"method.teacher.model_files=[{param}]", f"method.cache_dir={cache_dir}",
          f"engine.max_steps={cfg.kd_steps}"],  # the ramp ends at max_steps
         runs / "kd_student" / "export" / "student_ema.safetensors"),
    ]  # fmt: skip


def commands(cfg: DemoConfig, kd_param: Path | None = None) -> list[tuple[str, list[str], Path]]:
    out = Path(cfg.output_dir)
    py = sys.executable
    shards, runs, cache = out / "shards", out / "runs", out / "cache"
    teacher_w = runs / "teacher" / "export" / "unet_ema.safetensors"
    student_w = runs / "student" / "export" / "student_ema.safetensors"
    common = [f"output_dir={runs}", f"data.shards=[{shards}]", f"seed={cfg.seed}",
              f"scaling.num_workers={cfg.workers}"]  # fmt: skip
    cache_dir = cache / "teacher"  # a stable link to cache/<fingerprint>, made after caching
    kd = [] if kd_param is None else kd_commands(cfg, kd_param)
    kd_row = [] if kd_param is None else ["--predictor", f"kd_student={runs / 'kd_student'}"]
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
        *kd,
        ("evaluate the students vs teacher vs bicubic on held-out photos",
         [py, "-m", "distsr.evaluate", "--gt", str(out / "eval_hr"), "--seed", str(cfg.seed),
          "--teacher", str(runs / "teacher"), "--student", str(runs / "student"), *kd_row,
          "--sampler", "deterministic", "--out", str(out)],
         out / "report.md"),
    ]  # fmt: skip


def link_cache(cache: Path) -> None:
    """Point ``<cache>/teacher`` at ``<cache>/<fingerprint>`` (the one the job just wrote)."""
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
    kd_param = kd_teacher_file(cfg)
    if kd_param is None:
        print(f"[demo] note: the KD stages need the {cfg.kd_teacher} model of the ncnn wheels "
              "(pip install distsr[teachers]); leaving them out", flush=True)  # fmt: skip
    out = Path(cfg.output_dir)
    for title, cmd, done in commands(cfg, kd_param):
        if title.startswith("distil a one-step"):
            link_cache(out / "cache")
        if title.startswith("distil a small"):
            link_cache(out / "cache_kd")
        if title.startswith("evaluate"):
            held_out_photos(Path(cfg.output_dir) / "eval_hr", cfg.eval_size)
        stage(title, cmd, done)
    report = Path(cfg.output_dir) / "report.md"
    summary = {"report": str(report), "seconds": round(time.perf_counter() - t0)}
    (Path(cfg.output_dir) / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[demo] finished in {summary['seconds']} s; report: {report}", flush=True)
    return 0
