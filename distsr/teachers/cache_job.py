"""The teacher-caching job, everything but the Ray calls: config, the per-actor worker, opening
the cache folder, planning, retries and progress. ``jobs/cache_teacher.py`` runs the workers on a
Ray ActorPool (one task per input shard); ``run_in_process`` runs one worker here, shard after
shard (small data sets, tests).

Each worker holds the teacher and writes whole cache shards (``data.cache.TeacherCache.
write_shard``) from ``LiveTeacher.cache_fields``: the seeded noise of each sample
(``teachers.noise``), so any process regenerates the z_T a stored output started from. The
driver opens ``output/<teacher fingerprint>/`` once (``TeacherCache.create``: a new folder, or
one holding this teacher's outputs with the same seed and draws), skips the shards the manifest
lists as finished (after checking they were made from the same input content), and records each
finished shard in the manifest. A failed shard is retried ``retries`` times, then reported.

Noise diversity (``draws: K``). The live teacher draws a fresh z_T every step (TAD-SR
Algorithm 1), so over training the student sees the teacher's output from many z_T per crop. A
cache made with ``draws: 1`` holds one trajectory per crop: every time the crop comes back, the
student is distilled toward the same output from the same z_T. ``draws: K`` stores K
trajectories per crop from K different z_T (draw k from ``sample_seed(seed, key, k)``) and
training picks one per step and sample. The job's teacher cost grows K-fold, and so does the
outputs' storage (the stored condition and z_gt are kept once: for ResShift, z0 is a third of a
cache sample beside z_y and z_gt of the same shape, so K = 2 makes the cache 4/3 as large and
K = 4 twice as large); training speed is unchanged. With K >= the number of times training
sees each crop, the student sees (nearly) a new z_T whenever a crop returns, as with the live
teacher; K = 1 is the choice when the teacher's cost dominates.
"""

from __future__ import annotations

import collections
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from distsr.config import load_job_config
from distsr.data.cache import TeacherCache, shard_names
from distsr.data.reader import list_shards
from distsr.data.shards import count_samples
from distsr.runconfig import absolute_path, absolutize_file_keys
from distsr.teachers.base import Teacher
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.source import LiveTeacher

log = logging.getLogger("distsr.cache")


def load_config(argv: list[str]) -> CacheJobConfig:
    """``[CONFIG.yaml | -] [key=value ...]`` -> a validated ``CacheJobConfig``."""
    cfg = load_job_config(CacheJobConfig, argv)
    # local paths are made absolute here: Ray actors may run in another folder
    cfg.output = absolute_path(cfg.output)
    cfg.shards = [absolute_path(s) for s in cfg.shards]
    absolutize_file_keys(cfg.teacher)  # weights of any teacher kind
    return cfg


def build_job_teacher(cfg: CacheJobConfig, device: str) -> Teacher:
    """The teacher of ``cfg.teacher`` by its ``kind``; with ``decode``, its outputs as images."""
    from distsr.registry import build_teacher

    teacher = build_teacher(cfg.teacher, device)
    if cfg.decode:
        from distsr.teachers.pixels import PixelOutputs

        teacher = PixelOutputs(teacher)
    return teacher


class ShardWorker:
    """One teacher (built from ``cfg.teacher`` unless given) that writes whole cache shards;
    the body of a Ray actor in the job."""

    def __init__(self, cfg: CacheJobConfig, teacher: Teacher | None = None, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if teacher is None:
            teacher = build_job_teacher(cfg, "cuda" if cfg.use_gpu else "cpu")
        self.cfg = cfg
        self.source = LiveTeacher(teacher, cfg.seed, fresh_noise=False)

    def describe(self) -> dict:
        """What the cache folder records of the teacher: fingerprint parts and field names."""
        teacher = self.source.teacher
        return {"parts": teacher.fingerprint_parts(), "outputs": list(teacher.outputs),
                "stored": list(teacher.stored)}  # fmt: skip

    def cache_shard(self, cache: TeacherCache, task: dict) -> dict:
        """Never raises: a failure comes back as ``{"ok": False, "error": traceback}``."""
        start = time.perf_counter()
        try:
            entry = cache.write_shard(
                task["url"],
                lambda batch: self.source.cache_fields(batch, cache.draws),
                batch_size=self.cfg.batch_size,
                scale=self.cfg.teacher.scale,
            )
        except Exception:  # reported to the driver, which retries or lists the shard
            return {"name": task["name"], "ok": False, "error": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return {"name": task["name"], "ok": True, "entry": entry}


def open_cache(cfg: CacheJobConfig, teacher: dict) -> TeacherCache:
    """``output/<fingerprint>/`` for the teacher ``ShardWorker.describe`` gave."""
    return TeacherCache.create(cfg.output, teacher["parts"], noise_seed=cfg.seed,
                               draws=cfg.draws, outputs=teacher["outputs"],
                               stored=teacher["stored"])  # fmt: skip


@dataclass
class Plan:
    tasks: list[dict]  # {"name", "url"} of each shard to cache
    done: dict[str, dict]  # manifest entries of the shards already cached
    counts: dict[str, int | None]  # samples per input shard (None: not countable)

    def progress_bar(self, enabled: bool = True) -> tqdm:
        total = None if None in self.counts.values() else sum(self.counts.values())
        initial = sum(self.counts[n] for n in self.done) if total is not None else 0
        return tqdm(total=total, initial=initial, unit="sample", desc="cache", disable=not enabled)


def plan_shards(cache: TeacherCache, urls: Sequence[str]) -> Plan:
    """The shards to cache: those without a finished cache shard. A finished cache shard made
    from other content under the same name is refused (naming both), not overwritten."""
    names = shard_names(urls)
    finished = cache.finished()
    problems = cache.input_problems([u for n, u in zip(names, urls) if n in finished], finished)
    if problems:
        raise ValueError(
            f"{cache.path} already holds cache shards of other input shards under the same "
            f"names: {'; '.join(problems)}. Cache these shards into another output folder, or "
            "delete those cache shards to re-cache them."
        )
    tasks = [{"name": n, "url": u} for n, u in zip(names, urls) if n not in finished]
    done = {n: finished[n] for n in names if n in finished}
    return Plan(tasks, done, {n: _count(u) for n, u in zip(names, urls)})


def _count(url: str) -> int | None:
    try:
        return count_samples(Path(url)) if Path(url).is_file() else None
    except Exception:  # unreadable shard: its task will report it
        return None


class ShardLedger:
    """The driver's bookkeeping: attempts, shards in flight, retries, failures, progress; each
    finished shard is recorded in the cache manifest as it arrives."""

    def __init__(self, cache: TeacherCache, retries: int, bar: tqdm):
        self.cache, self.retries, self.bar = cache, retries, bar
        self.attempts: collections.Counter = collections.Counter()
        self.in_flight: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.written: list[str] = []

    def start(self, task: dict) -> dict:
        self.attempts[task["name"]] += 1
        self.in_flight[task["name"]] = task
        return task

    def finish(self, result: dict) -> dict | None:
        """Record a worker's result; returns the task to run again, if any."""
        task = self.in_flight.pop(result["name"])
        if not result["ok"]:
            return self._retry_or_fail(task, result["error"])
        entry = result["entry"]
        self.cache.record(task["name"], entry)
        self.written.append(task["name"])
        self.bar.update(entry["samples"] + entry["skipped"])
        self.bar.write(
            f"[cache] {task['name']}: {entry['samples']} sample(s), {entry['skipped']} "
            f"skipped, {entry['seconds']:.1f} s"
        )
        return None

    def lose_in_flight(self, why: str) -> list[dict]:
        """Every task in flight was lost (e.g. with its actor); returns those to run again."""
        lost = [self.in_flight.pop(name) for name in list(self.in_flight)]
        return [t for t in (self._retry_or_fail(task, why) for task in lost) if t is not None]

    def _retry_or_fail(self, task: dict, error: str) -> dict | None:
        name = task["name"]
        if self.attempts[name] <= self.retries:
            log.warning("shard %s failed (attempt %d of %d), retrying:\n%s", name,
                        self.attempts[name], self.retries + 1, error)  # fmt: skip
            return task
        log.error("shard %s failed %d time(s):\n%s", name, self.attempts[name], error)
        self.failed[name] = error.strip().splitlines()[-1] if error.strip() else error
        return None

    def summary(self, plan: Plan) -> dict:
        return {"cache_dir": str(self.cache.path), "fingerprint": self.cache.fingerprint,
                "shards": len(plan.counts), "cached": len(plan.done) + len(self.written),
                "written": sorted(self.written), "already_done": sorted(plan.done),
                "failed": dict(self.failed),
                "samples": self.cache.manifest().get("samples", 0)}  # fmt: skip


def announce(cache: TeacherCache, plan: Plan) -> None:
    print(f"[cache] teacher {cache.fingerprint} -> {cache.path}: {len(plan.tasks)} of "
          f"{len(plan.counts)} shard(s) to cache, {len(plan.done)} already done",
          flush=True)  # fmt: skip


def run_in_process(cfg: CacheJobConfig, teacher: Teacher | None = None, progress=False) -> dict:
    """The job without Ray: one ``ShardWorker`` here, shard after shard (``teacher`` given:
    cache that teacher instead of building ``cfg.teacher``). Returns the job's summary."""
    urls = list_shards(cfg.shards)
    shard_names(urls)  # unique names, checked before the teacher is built
    worker = ShardWorker(cfg, teacher)
    cache = open_cache(cfg, worker.describe())
    cache.remove_temp_files()
    plan = plan_shards(cache, urls)
    announce(cache, plan)
    with plan.progress_bar(progress) as bar:
        ledger = ShardLedger(cache, cfg.retries, bar)
        queue = collections.deque(plan.tasks)
        while queue:
            retry = ledger.finish(worker.cache_shard(cache, ledger.start(queue.popleft())))
            if retry is not None:
                queue.append(retry)
    return ledger.summary(plan)
