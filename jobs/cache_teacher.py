"""Cache a teacher's outputs next to the input shards (compute each trajectory once, offline).

    python jobs/cache_teacher.py [CONFIG.yaml | -] [key=value ...]

CONFIG holds ``distsr.teachers.config.CacheJobConfig`` fields at its top level (``-`` reads the
YAML from stdin; leave it out to configure by overrides only), e.g.

    python jobs/cache_teacher.py configs/cache_resshift_tiny.yaml \\
        teacher.unet_checkpoint=runs/resshift_tiny/unet.safetensors shards=[shards/tiny] \\
        output=cache num_actors=2 draws=1

The cache lands in ``OUTPUT/<teacher fingerprint>/`` (see ``distsr.data.cache``): one cache
shard per input shard, same name, written atomically, ``manifest.json`` updated after every
finished shard. Re-running the same command resumes (finished shards are skipped). One Ray task
per shard runs on a pool of actors that each hold the teacher (one GPU each with
``use_gpu=true``); the job joins the Ray cluster at ``RAY_ADDRESS`` or starts a private local
one. A shard that fails is retried ``retries`` times; the job then exits with status 1 and lists
the shards that still failed (finished shards are kept). The job's logic lives in
``distsr.teachers.cache_job``; this file holds only the Ray calls.
"""

from __future__ import annotations

import logging
import math
import sys

from distsr.data import storage
from distsr.data.cache import TeacherCache, shard_names
from distsr.data.reader import list_shards
from distsr.launch import ray_session
from distsr.teachers.cache_job import (
    ShardLedger,
    ShardWorker,
    announce,
    load_config,
    open_cache,
    plan_shards,
)
from distsr.teachers.config import CacheJobConfig

log = logging.getLogger("cache_teacher")
__all__ = ["load_config", "main", "run"]


def start_actors(cfg: CacheJobConfig, count: int) -> list:
    import ray

    if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("use_gpu=true but the Ray cluster has no GPU; set use_gpu=false")
    on_s3 = any(storage.is_remote(u) for u in [cfg.output, *cfg.shards])
    env = storage.worker_env() if on_s3 else {}  # s3://: the endpoint and credentials
    remote = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, max_restarts=0,
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )  # fmt: skip
    threads = 0 if cfg.use_gpu else max(1, int(cfg.cpus_per_actor))
    return [remote.remote(cfg, None, threads) for _ in range(count)]


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


def describe_teacher(actors: list) -> dict:
    """The teacher as every actor loaded it (all must agree): fingerprint parts, fields."""
    import ray

    try:
        every = ray.get([actor.describe.remote() for actor in actors])
    except ray.exceptions.RayActorError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError(f"the teacher could not be built in a Ray actor: {lines[-1]}") from err
    if any(described != every[0] for described in every):
        raise RuntimeError("the actors loaded different teachers (do they see the same files?)")
    return every[0]


def run_pool(cfg: CacheJobConfig, actors: list, cache: TeacherCache, ledger: ShardLedger,
             tasks: list[dict]) -> None:  # fmt: skip
    """One task per shard on a ``ray.util.ActorPool``; the ledger decides on retries."""
    import ray
    from ray.util import ActorPool

    pool = ActorPool(actors)

    def submit(task: dict) -> None:
        pool.submit(lambda actor, t: actor.cache_shard.remote(cache, t), ledger.start(task))

    for task in tasks:
        submit(task)
    while ledger.in_flight:
        if not pool.has_next():  # what is still in flight was lost with its actor
            for task in ledger.lose_in_flight("its actor died"):
                submit(task)
            continue
        try:
            result = pool.get_next_unordered()
        except ray.exceptions.RayActorError as err:
            log.warning("a teacher actor died (%s); starting a new one", type(err).__name__)
            if isinstance(err, ray.exceptions.ActorDiedError):
                pool.push(start_actors(cfg, 1)[0])
            continue
        retry = ledger.finish(result)
        if retry is not None:
            submit(retry)


def run(cfg: CacheJobConfig, progress: bool = True) -> dict:
    """Cache every shard of ``cfg.shards`` not cached yet; returns a summary (see ``main``)."""
    import ray

    urls = list_shards(cfg.shards)
    shard_names(urls)  # unique names, checked before any actor starts
    needed = math.ceil(cfg.num_actors * cfg.cpus_per_actor)
    with ray_session(needed, tag="cache"):
        actors: list = []
        try:
            actors = start_actors(cfg, actor_budget(cfg, len(urls)))
            cache = open_cache(cfg, describe_teacher(actors))
            if cache.remove_temp_files():
                log.info("removed the temp files of an interrupted run")
            plan = plan_shards(cache, urls)
            announce(cache, plan)
            for actor in actors[max(1, len(plan.tasks)) :]:
                ray.kill(actor)
            actors = actors[: max(1, len(plan.tasks))]
            with plan.progress_bar(progress) as bar:
                ledger = ShardLedger(cache, cfg.retries, bar)
                run_pool(cfg, actors, cache, ledger, plan.tasks)
            cache.remove_temp_files()
        finally:
            for actor in actors:
                ray.kill(actor)
    return ledger.summary(plan)


def main(argv: list[str] | None = None) -> dict:
    """Run the job; returns ``{cache_dir, fingerprint, shards, cached, written, already_done,
    failed, samples}`` (``failed``: shard name -> last error line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    summary = run(load_config(argv))
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
