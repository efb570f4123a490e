"""Ray Train (V2) adapter: TorchTrainer around the per-worker loop, checkpoints through Ray.

Every rank saves its own DeepSpeed shards into a private temp folder and reports it with the
same ``checkpoint_dir_name``; Ray merges them into ``run_dir/step_NNNNNNNN`` and registers the
checkpoint only when all ranks have uploaded, so a half-written checkpoint is never resumed.
Resume (after a worker failure, or a relaunch with the same run name and output folder) takes
the newer of ``ray.train.get_checkpoint()`` and the newest folder marked ``COMPLETE``. With
``output_dir: s3://...`` Ray's ``storage_path`` is that URL: Ray uploads the step folders, the
``COMPLETE`` markers are written there, the newest marked folder is downloaded when it is newer
than Ray's checkpoint, and the workers get this process's object-storage settings
(``data.storage.worker_env``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ray.train
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig
from ray.train import RunConfig as RayRunConfig
from ray.train import ScalingConfig as RayScalingConfig
from ray.train.torch import TorchTrainer

from distsr.data import storage
from distsr.engine import head
from distsr.engine.checkpoint import step_name
from distsr.engine.context import from_environment
from distsr.engine.loop import train_worker
from distsr.runconfig import RunConfig

COMPLETE = "COMPLETE"  # written by rank 0 once every rank's upload of a checkpoint returned


def resume_folder(run_dir: Path, ray_path: str | None) -> Path | None:
    """The checkpoint to resume from: the newer (by step) of Ray's latest checkpoint
    (``ray_path``) and the newest folder of ``run_dir`` marked ``COMPLETE``. A folder of
    ``run_dir`` without the marker is never taken, Ray's included (its rank 0 died before
    marking it); Ray's checkpoint stored elsewhere (remote storage) is taken on Ray's word
    that every rank uploaded it."""
    run_dir = Path(run_dir)
    marked = sorted(p.parent for p in run_dir.glob(f"step_*/{COMPLETE}"))
    candidates = marked[-1:]
    if ray_path is not None:
        ray_folder = Path(ray_path)
        local = ray_folder.parent.resolve() == run_dir.resolve()
        if not local or (ray_folder / COMPLETE).is_file():
            candidates.append(ray_folder)
    return max(candidates, key=lambda p: p.name, default=None)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's registry, kept in the run


def unknown_to_ray(run_dir: Path) -> frozenset[str]:
    """Step folders of ``run_dir`` that Ray's persisted checkpoint registry does not list: left by
    a launch killed before Ray registered them. Ray never deletes these; ``RayStore`` does."""
    known = known_to_ray(run_dir)
    return frozenset(p.name for p in run_dir.glob("step_*") if p.name not in known)


def known_to_ray(run_dir: Path) -> set[str]:
    """Folder names Ray's persisted registry lists (registered, latest or pending)."""
    snapshot = run_dir / RAY_SNAPSHOT
    text = snapshot.read_text() if snapshot.is_file() else ""
    return set(re.findall(r'"checkpoint_dir_name":\s*"([^"]+)"', text))


class RayStore:
    """Checkpoints through ``ray.train.report``. Ray's registry of reported checkpoints can lag
    behind a worker or driver that dies (results are polled), so every checkpoint whose uploads
    all returned is also marked ``COMPLETE`` in the run folder, and resume takes the newer of
    Ray's latest checkpoint and the newest complete folder (``resume_folder``)."""

    def __init__(self, rank: int, run_dir: Path, keep: int, earlier: frozenset[str] = frozenset(),
                 launch: str = "", run_url: str | None = None):  # fmt: skip
        self.rank = rank
        self.run_url = run_url or str(run_dir)  # where the step folders are (s3:// or run_dir)
        self.launch = launch  # this launch's id, written into the markers it writes
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.earlier = earlier  # step folders of earlier launches Ray's registry never saw

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if storage.is_remote(self.run_url):
            with self.latest_remote(checkpoint) as folder:
                yield folder
            return
        chosen = resume_folder(self.run_dir, checkpoint.path if checkpoint else None)
        if chosen is None or checkpoint is None or chosen != Path(checkpoint.path):
            yield chosen
            return
        with checkpoint.as_directory() as folder:  # downloaded when stored remotely
            yield Path(folder)

    @contextlib.contextmanager
    def latest_remote(self, checkpoint) -> Iterator[Path | None]:
        """``latest`` on object storage: the newer of Ray's checkpoint and the newest step
        folder marked ``COMPLETE`` there, downloaded into a temp folder."""
        files = storage.walk(self.run_url)
        marked = sorted(f.split("/")[0] for f in files
                        if f.startswith("step_") and f.endswith(f"/{COMPLETE}"))  # fmt: skip
        ray_name = Path(checkpoint.path).name if checkpoint is not None else ""
        if checkpoint is not None and (not marked or ray_name >= marked[-1]):
            with checkpoint.as_directory() as folder:
                yield Path(folder)
            return
        if not marked:
            yield None
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"distsr-{marked[-1]}-rank{self.rank}-"))
        try:
            for rel in [f for f in files if f.startswith(f"{marked[-1]}/")]:
                storage.get_file(storage.join(self.run_url, rel), tmp / rel.split("/", 1)[1])
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def preemption(self) -> str | None:
        """Ray Train's notice that a node of this run is being drained for preemption (a spot
        reclaim the cluster's autoscaler reported, or ``ray drain-node --reason
        DRAIN_NODE_REASON_PREEMPTION``), described; None without one. Collective: every rank
        asks at the same step."""
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        when = "no deadline" if info.deadline_ms is None else f"deadline {info.deadline_ms} ms"
        return f"ranks {info.preempted_ranks} on {len(info.preempted_node_ids)} node(s), {when}"

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f"distsr-{step_name(step)}-rank{self.rank}-"))
        try:
            write(tmp)
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                checkpoint=Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=step_name(step),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()  # every rank's upload (synchronous) has returned
        folder = storage.join(self.run_url, step_name(step))
        if self.rank == 0 and storage.is_dir(folder):
            marker = f"all ranks uploaded; launch {self.launch}\n".encode()
            storage.write_bytes(storage.join(folder, COMPLETE), marker)
            if not storage.is_remote(folder):  # a killed launch's folders stay on object storage
                self.prune_earlier()

    def prune_earlier(self) -> None:
        """Ray keeps the newest ``keep`` of the checkpoints it registered; the folders an earlier
        (killed) launch left unregistered, complete or not, are removed here once they are older
        than the ``keep`` newest complete ones."""
        marked = sorted(p.parent.name for p in self.run_dir.glob(f"step_*/{COMPLETE}"))
        if len(marked) < self.keep:
            return
        # a folder this launch wrote again (it resumed before that step) is Ray's to prune now
        ours = {n for n in marked if self.launch and self.launch in self.marker(n)}
        for name in sorted(self.earlier - ours - known_to_ray(self.run_dir)):
            if name < marked[-self.keep]:
                shutil.rmtree(self.run_dir / name, ignore_errors=True)

    def marker(self, name: str) -> str:
        try:
            return (self.run_dir / name / COMPLETE).read_text()
        except OSError:
            return ""


def _ray_worker(config: dict) -> None:
    cfg: RunConfig = config["run_config"]  # parsed on the driver, pickled by Ray
    ctx = from_environment()
    store = RayStore(ctx.rank, cfg.run_dir, cfg.engine.checkpoint.keep, config["earlier"],
                     config["launch"], cfg.run_url)  # fmt: skip
    train_worker(cfg, ctx, store)


def head_lost_message(cfg: RunConfig, address: str) -> str:
    """What the driver prints when the head is lost (``engine/head.py``): the checkpoint a
    relaunch resumes from."""
    newest = resume_folder(Path(cfg.run_dir), None) if not storage.is_remote(cfg.run_url) else None
    where = f"it resumes from the newest step folder marked {COMPLETE} in {cfg.run_url}"
    if newest is not None:
        where = f"its newest complete checkpoint is {newest}"
    return (
        f"[distsr] lost the Ray head: its GCS at {address} does not answer, so the cluster's "
        f"control plane is gone and this run stops; "
        f"{where}. Start the head again (or a new cluster reaching the same storage) and "
        f"launch the same command with the same name and output_dir to resume."
    )


def fit(cfg: RunConfig):
    """Run the training on the connected Ray cluster; returns Ray's ``Result``."""
    s = cfg.scaling
    earlier = unknown_to_ray(Path(cfg.run_dir))
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    remote = storage.is_remote(cfg.run_url)
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(storage.worker_env() if remote else {})}
    if s.start_timeout_s is not None:  # read by Ray Train's controller, which gets it from here
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(s.start_timeout_s)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"run_config": cfg, "earlier": earlier, "launch": uuid.uuid4().hex},
        scaling_config=RayScalingConfig(
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=s.resize_interval_s,
        ),
        run_config=RayRunConfig(
            name=cfg.name,
            storage_path=cfg.output_dir if remote else str(cfg.run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.engine.checkpoint.keep),
            # Train V2 re-routes print() through logging, which showed every line twice
            worker_runtime_env={"env_vars": env},
        ),
    )
    address = ray.get_runtime_context().gcs_address
    with head.watch(address, lambda: head_lost_message(cfg, address)):
        return trainer.fit()
