"""Cache-job benchmark: samples per second of the teacher-caching job against the bare teacher
sampler, on the same device, batch size and threads, in one run.

Arms, alternated ``repeats`` times so that drifts of the machine hit all of them:
* ``job``: the caching job as each of its workers runs it (``cache_job.run_in_process``: shard
  reading and decoding, the sampler, encoding, the atomic shard writes, the manifest), into a
  new cache folder every repeat, with the teacher the bare arms use (building a teacher is a
  once-per-worker cost, reported apart as ``teacher_build_s``);
* ``job_ray`` (only when the caller passes ``ray_job``, as ``jobs/bench_cache_job.py`` does):
  the job through Ray with one actor (``jobs/cache_teacher.py``), actor start-up included;
* ``bare``: what the cache stores, computed by the same ``LiveTeacher.cache_fields`` on the
  same batches already decoded in memory (the sampler, the seeded noise, the gt encoding):
  no reading, no writing, no Ray;
* ``sampler``: ``Teacher.sample`` alone on those batches (the noise drawn before the clock).
The report gives each arm's median samples/s and range, and ``job / bare`` per repeat.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distsr.bench.cache import SIZES, make_data, random_teacher, shard_options, spread
from distsr.bench.cli import torch_threads, write_report
from distsr.config import CONFIG_DIR, apply_overrides
from distsr.data.cache import _batches
from distsr.data.reader import iter_samples, list_shards
from distsr.teachers.cache_job import ShardWorker, load_config, run_in_process
from distsr.teachers.source import rounded_cond

# (cache job config) -> the job's summary, through Ray
RayJob = Callable[[object], dict]


def parse(argv: list[str]) -> dict:
    opts = {"size": "tiny", "repeats": 3, "batch_size": 4, "threads": 2, "ray": False,
            "crop_size": None, "random_crops": None, "out": "runs/bench_cache_job"}  # fmt: skip
    opts = apply_overrides(opts, list(argv))
    if opts["size"] not in SIZES:
        raise SystemExit(f"size must be one of {sorted(SIZES)}, got {opts['size']!r}")
    opts["shards"] = shard_options(opts)
    return opts


def job_config(opts: dict, shards: Path, teacher: list[str], output: Path):
    cache_config = CONFIG_DIR / f"{SIZES[opts['size']][1]}.yaml"
    return load_config([str(cache_config), *(f"teacher.{o}" for o in teacher),
                        f"shards=[{shards}]", f"output={output}", "num_actors=1",
                        "use_gpu=false", "cpus_per_actor=1",
                        f"batch_size={opts['batch_size']}"])  # fmt: skip


def timed_job(cfg, job: Callable[[object], dict]) -> tuple[float, int]:
    """(seconds, samples) of one job run into an empty output folder."""
    shutil.rmtree(cfg.output, ignore_errors=True)
    t0 = time.perf_counter()
    summary = job(cfg)
    seconds = time.perf_counter() - t0
    assert not summary["failed"], summary["failed"]
    return seconds, summary["samples"]


def bare_arms(worker: ShardWorker, cfg, batch_size: int) -> dict[str, Callable[[], float]]:
    """Timers (-> seconds) of the in-memory arms over every sample of the shards."""
    source, teacher = worker.source, worker.source.teacher
    scale = cfg.teacher.scale
    batches = [b for url in list_shards(cfg.shards)
               for b in _batches(iter_samples(url, scale=scale), batch_size)]  # fmt: skip

    def bare() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            source.cache_fields(batch)
        return time.perf_counter() - t0

    conds = [rounded_cond(teacher, b["lq"], b["gt"]) for b in batches]
    noises = [source.noise(list(b["__key__"]), c, draw=0) for b, c in zip(batches, conds)]

    def sampler() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for cond, noise in zip(conds, noises):
                source.sample(cond, noise)
        return time.perf_counter() - t0

    return {"bare": bare, "sampler": sampler, "samples": sum(len(b["__key__"]) for b in batches)}


def bench_cache_job(opts: dict, ray_job: RayJob | None = None) -> dict:
    out = Path(opts["out"]).resolve()
    shards = make_data(out, opts)
    teacher = random_teacher(out, opts["size"])
    cfg = job_config(opts, shards, teacher, out / "cache")
    rates: dict[str, list[float]] = {"job": [], "bare": [], "sampler": []}
    if ray_job is not None:
        rates["job_ray"] = []
    with torch_threads(opts["threads"]):
        t0 = time.perf_counter()
        worker = ShardWorker(cfg)
        build_s = time.perf_counter() - t0
        arms = bare_arms(worker, cfg, opts["batch_size"])
        n = arms.pop("samples")
        job = functools.partial(run_in_process, teacher=worker.source.teacher)
        for _ in range(opts["repeats"]):
            seconds, samples = timed_job(cfg, job)
            assert samples == n, (samples, n)
            rates["job"].append(n / seconds)
            if ray_job is not None:
                rates["job_ray"].append(n / timed_job(cfg, ray_job)[0])
            for name, timer in arms.items():
                rates[name].append(n / timer())
    result = {f"samples_per_s_{k}": spread(v) for k, v in rates.items()}
    result["job_over_bare"] = spread([j / b for j, b in zip(rates["job"], rates["bare"])])
    if ray_job is not None:
        result["job_ray_over_bare"] = spread([j / b for j, b in
                                              zip(rates["job_ray"], rates["bare"])])  # fmt: skip
    result |= {"teacher_build_s": round(build_s, 2), "samples": n,
               "batch_size": opts["batch_size"], "threads": opts["threads"],
               "size": opts["size"], "repeats": opts["repeats"],
               "teacher_steps": cfg.teacher.schedule.steps}  # fmt: skip
    write_report(out, "result", result, table(result))
    return result


def table(result: dict) -> str:
    rows = ["| arm | samples/s, median (range) |", "|---|---|"]
    for key, value in result.items():
        if key.startswith("samples_per_s_") or key.endswith("_over_bare"):
            rows.append(f"| {key.removeprefix('samples_per_s_')} | {fmt(value)} |")
    return "\n".join(rows) + "\n"


def fmt(spread_: dict) -> str:
    return f"{spread_['median']:.3g} ({spread_['min']:.3g}-{spread_['max']:.3g})"
