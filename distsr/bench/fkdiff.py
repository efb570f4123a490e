"""A real FKdiff result at laptop scale: FASRer_S with PHexKD vs FASRer_S alone vs bicubic.

Data: gt crops of the photos bundled with scikit-image / matplotlib, lq by antialiased bicubic x4
(``kd.make_data``); the held-out photos (``bundled:eval``, centre crops) are never cut
into training shards. Every arrow is the pipeline a user runs, in this process:

    1. ``fkdiff_pretrain``  the teacher restorer + CFE_D, L1                     (stage 1)
    2. ``fkdiff_prior``     CFE_R + the T = 4 prior denoiser, stage 1 frozen     (stage 2)
    3. the teacher cache job: the sampled Z_hat of every training crop
    4. ``fkdiff``           PHexKD: locked teacher + FASRer_L + FASRer_S + FDD blocks
    5. ``fkdiff`` with ``distill: false``: FASRer_S alone, L1 to gt, the same Z_hat, steps,
       batches, init seed and optimizer as its PHexKD twin
    6. ``evaluate.cli.evaluate``: bicubic, the teacher (restorer on the sampled Z_hat), FASRer_L
       and both FASRer_S on the held-out photos (PSNR / SSIM on Y)

Everything lands in ``output``; a re-run skips what is done. ``jobs/bench_fkdiff.py`` is the
command line. The networks are narrower than the paper's (CPU): the table prints their sizes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distsr.bench.cli import write_report
from distsr.bench.kd import cache, make_data, run_dict, table, train
from distsr.models.fkdiff.config import CFEConfig, FASRerConfig, FKdiffNetConfig, PriorConfig


def _net() -> FKdiffNetConfig:
    return FKdiffNetConfig(dim=16, blocks=[2, 1, 1, 1], refinement_blocks=2, heads=[1, 2, 2, 4],
                           ffn_expansion=2.0, prior_channels=16)  # fmt: skip


@dataclass
class BenchFKdiffConfig:
    output: str = "runs/bench_fkdiff"
    crop_size: int = 64  # gt crops of the training shards (lq 16 x 16)
    stride: int = 64
    pretrain_steps: int = 800  # stage 1
    prior_steps: int = 300  # stage 2
    steps: int = 500  # each FASRer_S run (PHexKD and alone)
    batch_size: int = 8
    lr: float = 1.0e-3  # every run (the paper's 2e-4 / 1e-4 are for 300k-step runs)
    net: FKdiffNetConfig = field(default_factory=_net)
    cfe: CFEConfig = field(default_factory=lambda: CFEConfig(prior_channels=16, res_blocks=2))
    prior: PriorConfig = field(default_factory=lambda: PriorConfig(prior_channels=16, width=64))
    student: FASRerConfig = field(default_factory=lambda: FASRerConfig(
        dim=16, blocks=[6, 1, 1, 2], patch_size=4, prior_channels=16))  # fmt: skip
    student_l: FASRerConfig = field(default_factory=lambda: FASRerConfig(
        dim=16, blocks=[8, 2, 2, 2], patch_size=4, prior_channels=16))  # fmt: skip
    eval_size: int = 256  # held-out photos are centre-cropped to this HR size
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    seed: int = 0

    def validate(self):
        problems = []
        for key in ("crop_size", "pretrain_steps", "prior_steps", "steps", "batch_size"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.crop_size % 4 or self.eval_size % 4:
            problems.append(("crop_size", "crop_size and eval_size must be multiples of 4 (x4)"))
        return problems


LABELS = {"teacher": "teacher: restorer(lq, Z_hat), Z_hat sampled (T = 4)",
          "fasrer_l": "FASRer_L (PHexKD run)", "phexkd": "FASRer_S with PHexKD",
          "alone": "FASRer_S alone (L1 to gt)"}  # fmt: skip


def fkdiff_run(cfg, out, shards, name, recipe, method, steps) -> dict:
    """``kd.run_dict`` with this bench's learning rate."""
    run = run_dict(cfg, out, shards, name, recipe, method, steps)
    run["engine"]["optimizer"]["lr"] = cfg.lr
    return run


def train_teacher(cfg: BenchFKdiffConfig, out: Path, shards: Path, timings: dict) -> dict:
    """Stages 1 and 2; returns the teacher section (``teachers.fkdiff.FKdiffTeacherConfig``)."""
    nets = {"net": asdict(cfg.net), "cfe": asdict(cfg.cfe)}
    run = fkdiff_run(cfg, out, shards, "pretrain", "fkdiff_pretrain", nets, cfg.pretrain_steps)
    stage1_dir, timings["train stage 1 (restorer + CFE_D)"] = train(run, "restorer_ema.safetensors")
    stage1 = str(stage1_dir / "export" / "restorer_ema.safetensors")
    method = {**nets, "prior": asdict(cfg.prior), "restorer_checkpoint": stage1}
    run = fkdiff_run(cfg, out, shards, "prior", "fkdiff_prior", method, cfg.prior_steps)
    prior_dir, timings["train stage 2 (CFE_R + denoiser)"] = train(run, "prior_ema.safetensors")
    return {"kind": "fkdiff", **nets, "prior": asdict(cfg.prior), "restorer_checkpoint": stage1,
            "prior_checkpoint": str(prior_dir / "export" / "prior_ema.safetensors")}  # fmt: skip


def train_students(cfg, out, shards, teacher: dict, cache_dir: str, timings) -> dict[str, Path]:
    runs = {}
    for name, distill in (("phexkd", True), ("alone", False)):
        method = {"teacher": teacher, "cache_dir": cache_dir, "student": asdict(cfg.student),
                  "student_l": asdict(cfg.student_l), "distill": distill}  # fmt: skip
        run = fkdiff_run(cfg, out, shards, f"student_{name}", "fkdiff", method, cfg.steps)
        runs[name], timings[f"train FASRer_S {name}"] = train(run, "student_ema.safetensors")
    return runs


def predictors(teacher: dict, runs: dict[str, Path]) -> dict:
    """bicubic, the teacher, FASRer_L and each FASRer_S (all fed the teacher's sampled Z_hat)."""
    from distsr.config import from_dict
    from distsr.inference.fkdiff import FASRerPredictor, fasrer_predictor
    from distsr.inference.predictors import Bicubic, load_predictor
    from distsr.models.fkdiff.prior import PriorSchedule
    from distsr.recipes.fkdiff import FASRerStudent
    from distsr.runconfig import load_run_config
    from distsr.teachers.fkdiff import FKdiffTeacherConfig, load_prior, load_stage1

    tcfg = from_dict(FKdiffTeacherConfig, teacher, source="bench_fkdiff")
    schedule = PriorSchedule(tcfg.prior)
    found = {"bicubic": Bicubic(4)}
    found["teacher"] = FASRerPredictor(load_stage1(tcfg).restorer, load_prior(tcfg), schedule)
    phexkd = runs["phexkd"]  # FASRer_L: the PHexKD run's second student, fed the same prior
    config = phexkd / "config.yaml"
    spec = FASRerStudent(load_run_config(str(config)).method.student_l, tcfg)
    found["fasrer_l"] = fasrer_predictor(phexkd / "export" / "student_l.safetensors", spec, config)
    for name in ("phexkd", "alone"):
        found[name] = load_predictor(runs[name], "ema", device="cpu")
    return found


def bench_fkdiff(cfg: BenchFKdiffConfig) -> dict:
    """Run the benchmark; returns ``{"table", "notes", "timings", "result"}`` and writes
    ``output/bench_fkdiff.md`` + ``output/bench_fkdiff.json``."""
    from distsr.data.config import DegradationConfig
    from distsr.evaluate.cli import evaluate, hr_pairs

    t_start = time.perf_counter()
    out = Path(cfg.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shards, eval_hr = make_data(cfg, out)  # reads crop_size, stride, seed, eval_size
    timings["make shards"] = time.perf_counter() - t0
    teacher = train_teacher(cfg, out, shards, timings)
    t0 = time.perf_counter()
    cache_dir = cache(teacher, shards, out)
    timings["cache Z_hat"] = time.perf_counter() - t0
    runs = train_students(cfg, out, shards, teacher, cache_dir, timings)
    t0 = time.perf_counter()
    pairs, _ = hr_pairs(eval_hr, DegradationConfig(kind="bicubic", scale=4), cfg.seed)
    info = {"held-out photos": ", ".join(sorted(p[0] for p in pairs)),
            "lq": "antialiased bicubic x4 of centre crops"}  # fmt: skip
    result = evaluate(predictors(teacher, runs), pairs, cfg.metrics, out / "eval",
                      warmup=False, info=info)  # fmt: skip
    timings["evaluate"] = time.perf_counter() - t0
    seconds = {"phexkd": timings["train FASRer_S phexkd"], "alone": timings["train FASRer_S alone"]}
    md = table(result, seconds, LABELS)
    timings["total"] = time.perf_counter() - t_start
    notes = [f"steps: stage 1 {cfg.pretrain_steps}, stage 2 {cfg.prior_steps}, each FASRer_S "
             f"{cfg.steps} (batch {cfg.batch_size}, lr {cfg.lr})"]  # fmt: skip
    summary = {"table": md, "notes": notes, "timings": timings, "config": asdict(cfg),
               "result": result}  # fmt: skip
    record = {k: v for k, v in summary.items() if k != "result"}
    write_report(out, "bench_fkdiff", record, md + "".join(f"\n* {n}" for n in notes) + "\n",
                 indent=1)  # fmt: skip
    return summary
