"""Cache a teacher's outputs next to the input shards (compute each trajectory once, offline).

    python jobs/cache_teacher.py [CONFIG.yaml | -] [key=value ...]

CONFIG holds ``distsr.teachers.config.CacheJobConfig`` fields at its top level (``-`` reads the
YAML from stdin; leave it out to configure by overrides only), e.g.

    python jobs/cache_teacher.py configs/cache_resshift_tiny.yaml \\
        teacher.unet_checkpoint=runs/resshift_tiny/unet.safetensors shards=[shards/tiny] \\
        output=cache num_actors=2

The cache lands in ``OUTPUT/<teacher fingerprint>/`` (see ``distsr.data.cache``): one cache
shard per input shard, same name, written atomically, ``manifest.json`` updated after every
finished shard. Re-running the same command resumes (finished shards are skipped). One Ray task
per shard runs on a pool of actors that each hold the teacher (one GPU each with
``use_gpu=true``); the job joins the Ray cluster at ``RAY_ADDRESS`` or starts a private local
one. A shard that fails is retried ``retries`` times; the job then exits with status 1 and lists
the shards that still failed (finished shards are kept).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from tqdm import tqdm

from distsr.config import load_job_config
from distsr.data import cache
from distsr.data.reader import list_shards
from distsr.data.shards import count_samples
from distsr.runconfig import absolute_path
from distsr.teachers.base import fingerprint_of
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.resshift import build_teacher
from distsr.teachers.source import LiveTeacher, check_cache

log = logging.getLogger("cache_teacher")


def load_config(argv: list[str]) -> CacheJobConfig:
    """``[CONFIG.yaml | -] [key=value ...]`` -> a validated ``CacheJobConfig``."""
    cfg = load_job_config(CacheJobConfig, argv)
    # local paths are made absolute here: Ray actors may run in another folder
    cfg.output = absolute_path(cfg.output)
    cfg.shards = [absolute_path(s) for s in cfg.shards]
    cfg.teacher.unet_checkpoint = absolute_path(cfg.teacher.unet_checkpoint)
    if cfg.teacher.autoencoder.checkpoint:
        cfg.teacher.autoencoder.checkpoint = absolute_path(cfg.teacher.autoencoder.checkpoint)
    return cfg


class TeacherWorker:
    """A Ray actor holding one teacher; ``cache_shard`` writes one cache shard."""

    def __init__(self, cfg: CacheJobConfig):
        import torch

        device = "cuda" if cfg.use_gpu else "cpu"
        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.source = LiveTeacher(build_teacher(cfg.teacher, device), cfg.seed)

    def fingerprint_parts(self) -> dict:
        return self.source.teacher.fingerprint_parts()

    def cache_shard(self, task: dict) -> dict:
        """Never raises: a failure comes back as ``{"ok": False, "error": traceback}``."""
        start = time.perf_counter()
        try:
            entry = cache.write_cache_shard(
                task["url"],
                Path(task["path"]),
                self.source.cache_fields,
                batch_size=self.cfg.batch_size,
                scale=self.cfg.teacher.scale,
            )
        except Exception:  # reported to the driver, which retries or lists the shard
            return {"name": task["name"], "ok": False, "error": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return {"name": task["name"], "ok": True, "entry": entry}


def connect_ray(cfg: CacheJobConfig) -> bool:
    """Join ``RAY_ADDRESS`` or start a private local cluster, unless Ray is already initialised
    (then use it). Returns whether this call started Ray (so the job shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        where = f"the cluster at RAY_ADDRESS={address}"
    else:
        needed = math.ceil(cfg.num_actors * cfg.cpus_per_actor)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed))
        where = "a new local Ray cluster (set RAY_ADDRESS to use another)"
    resources = ray.cluster_resources()
    print(f"[cache] Ray: {where}: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs", flush=True)  # fmt: skip
    return True


def start_actors(cfg: CacheJobConfig, count: int) -> list:
    import ray

    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=true but the Ray cluster has no GPU; set use_gpu=false")
    remote = ray.remote(TeacherWorker).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, max_restarts=0
    )
    return [remote.remote(cfg) for _ in range(count)]


def actor_budget(cfg: CacheJobConfig, tasks: int) -> int:
    """Actors to start: at most one per task and what the cluster can hold at once."""
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("CPU", 0) // cfg.cpus_per_actor
    if cfg.use_gpu:
        fits = min(fits, resources.get("GPU", 0))
    count = max(1, min(cfg.num_actors, tasks, int(fits)))
    if count < min(cfg.num_actors, tasks):
        log.warning("starting %d actor(s), not %d: that is what the cluster fits", count,
                    cfg.num_actors)  # fmt: skip
    return count


def open_cache_dir(cfg: CacheJobConfig, parts: dict, fingerprint: str) -> Path:
    """``output/<fingerprint>/`` with a teacher.json that matches this teacher and seed."""
    cache_dir = cache.cache_dir_for(cfg.output, fingerprint)
    cache_dir.mkdir(parents=True, exist_ok=True)
    info = cache.read_json(cache_dir / cache.TEACHER_JSON)
    if info is None:
        cache.write_teacher_info(cache_dir, fingerprint, parts, cfg.seed)
        return cache_dir
    check_cache(cache_dir, _PartsOnly(parts, fingerprint))
    if info.get("noise_seed") != cfg.seed:
        raise ValueError(
            f"{cache_dir} was cached with seed={info.get('noise_seed')}, this run has "
            f"seed={cfg.seed}: use that seed or another output folder"
        )
    return cache_dir


class _PartsOnly:
    """What ``check_cache`` needs of a teacher, when the teacher lives in the actors."""

    def __init__(self, parts: dict, fingerprint: str):
        self.parts, self._fingerprint = parts, fingerprint

    def fingerprint_parts(self) -> dict:
        return self.parts

    def fingerprint(self) -> str:
        return self._fingerprint


def plan_tasks(urls: list[str], cache_dir: Path) -> tuple[list[dict], dict, dict]:
    """(tasks to run, finished shards, sample count per shard or None)."""
    names = cache.shard_names(urls)
    done = cache.finished_shards(cache_dir)
    counts = {name: _count(url) for name, url in zip(names, urls)}
    tasks = [
        {"name": name, "url": url, "path": str(cache_dir / name)}
        for name, url in zip(names, urls)
        if name not in done
    ]
    return tasks, {n: done[n] for n in names if n in done}, counts


def _count(url: str) -> int | None:
    try:
        return count_samples(Path(url)) if Path(url).is_file() else None
    except Exception:  # unreadable shard: its task will report it
        return None


class ShardPool:
    """One Ray task per shard on a ``ray.util.ActorPool``; failures retried, then reported."""

    def __init__(self, cfg: CacheJobConfig, actors: list, cache_dir: Path, header: dict, bar):
        from ray.util import ActorPool

        self.cfg, self.cache_dir, self.header, self.bar = cfg, cache_dir, header, bar
        self.pool = ActorPool(actors)
        self.attempts: collections.Counter = collections.Counter()
        self.in_flight: dict[str, dict] = {}
        self.failed: dict[str, str] = {}
        self.written: list[str] = []

    def submit(self, task: dict) -> None:
        self.attempts[task["name"]] += 1
        self.in_flight[task["name"]] = task
        self.pool.submit(lambda actor, t: actor.cache_shard.remote(t), task)

    def run(self, tasks: list[dict]) -> None:
        import ray

        for task in tasks:
            self.submit(task)
        while self.in_flight:
            if not self.pool.has_next():  # what is still in flight was lost with its actor
                for task in list(self.in_flight.values()):
                    self.retry_or_fail(self.in_flight.pop(task["name"]), "its actor died")
                continue
            try:
                result = self.pool.get_next_unordered()
            except ray.exceptions.RayActorError as err:
                log.warning("a teacher actor died (%s); starting a new one", type(err).__name__)
                if isinstance(err, ray.exceptions.ActorDiedError):
                    self.pool.push(start_actors(self.cfg, 1)[0])
                continue
            self.finish(self.in_flight.pop(result["name"]), result)

    def finish(self, task: dict, result: dict) -> None:
        if not result["ok"]:
            self.retry_or_fail(task, result["error"])
            return
        entry = result["entry"]
        cache.record_finished(self.cache_dir, task["name"], entry, self.header)
        self.written.append(task["name"])
        self.bar.update(entry["samples"] + entry["skipped"])
        self.bar.write(
            f"[cache] {task['name']}: {entry['samples']} sample(s), {entry['skipped']} "
            f"skipped, {entry['seconds']:.1f} s"
        )

    def retry_or_fail(self, task: dict, error: str) -> None:
        name = task["name"]
        if self.attempts[name] <= self.cfg.retries:
            log.warning("shard %s failed (attempt %d of %d), retrying:\n%s", name,
                        self.attempts[name], self.cfg.retries + 1, error)  # fmt: skip
            self.submit(task)
        else:
            log.error("shard %s failed %d time(s):\n%s", name, self.attempts[name], error)
            self.failed[name] = error.strip().splitlines()[-1] if error.strip() else error


def run(cfg: CacheJobConfig, progress: bool = True) -> dict:
    """Cache every shard of ``cfg.shards`` not cached yet; returns a summary (see ``main``)."""
    import ray

    urls = list_shards(cfg.shards)
    cache.shard_names(urls)  # unique names, checked before any actor starts
    started = connect_ray(cfg)
    actors: list = []
    try:
        actors = start_actors(cfg, actor_budget(cfg, len(urls)))
        parts = teacher_parts(actors)
        fingerprint = fingerprint_of(parts)
        cache_dir = open_cache_dir(cfg, parts, fingerprint)
        if cache.remove_temp_files(cache_dir):
            log.info("removed the temp files of an interrupted run")
        tasks, done, counts = plan_tasks(urls, cache_dir)
        print(f"[cache] teacher {fingerprint} -> {cache_dir}: {len(tasks)} of {len(counts)} "
              f"shard(s) to cache, {len(done)} already done", flush=True)  # fmt: skip
        for actor in actors[max(1, len(tasks)) :]:
            ray.kill(actor)
        actors = actors[: max(1, len(tasks))]
        header = {"fingerprint": fingerprint, "noise_seed": cfg.seed}
        total = None if None in counts.values() else sum(counts.values())
        initial = sum(counts[n] for n in done) if total is not None else 0
        bar = tqdm(total=total, initial=initial, unit="sample", desc="cache", disable=not progress)
        with bar:
            pool = ShardPool(cfg, actors, cache_dir, header, bar)
            pool.run(tasks)
        cache.remove_temp_files(cache_dir)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return {"cache_dir": str(cache_dir), "fingerprint": fingerprint, "shards": len(counts),
            "cached": len(done) + len(pool.written), "written": sorted(pool.written),
            "already_done": sorted(done), "failed": pool.failed,
            "samples": cache.read_manifest(cache_dir).get("samples", 0)}  # fmt: skip


def teacher_parts(actors: list) -> dict:
    """The fingerprint parts of the teacher, once every actor has loaded it (all must agree)."""
    import ray

    try:
        every = ray.get([actor.fingerprint_parts.remote() for actor in actors])
    except ray.exceptions.RayActorError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError(f"the teacher could not be built in a Ray actor: {lines[-1]}") from err
    if any(parts != every[0] for parts in every):
        raise RuntimeError("the actors loaded different teachers (do they see the same files?)")
    return every[0]


def main(argv: list[str] | None = None) -> dict:
    """Run the job; returns ``{cache_dir, fingerprint, shards, written, already_done, failed,
    samples}`` (``failed``: shard name -> last error line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    cfg = load_config(argv)
    summary = run(cfg)
    print(f"[cache] {summary['cache_dir']}: {summary['cached']} of "
          f"{summary['shards']} shard(s) cached, {summary['samples']} sample(s); wrote "
          f"{len(summary['written'])} now", flush=True)  # fmt: skip
    for name, error in summary["failed"].items():
        print(f"[cache] FAILED {name}: {error}", file=sys.stderr, flush=True)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    sys.exit(1 if result.get("failed") else 0)
