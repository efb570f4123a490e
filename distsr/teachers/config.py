"""Config of the teacher-caching job (``jobs/cache_teacher.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from distsr.teachers.fkdiff import FKdiffTeacherConfig
from distsr.teachers.resshift import TeacherConfig
from distsr.teachers.seesr_config import SeeSRTeacherConfig
from distsr.teachers.sr import AggregatedTeacherConfig, RegressionTeachersConfig


@dataclass
class CacheJobConfig:
    """Run ``teacher`` over every input shard once and store its outputs under
    ``output/<teacher fingerprint>/`` (one cache shard per input shard, same name).

    One Ray task per shard on a pool of ``num_actors`` actors, each holding the teacher (one GPU
    per actor with ``use_gpu``). ``seed`` seeds each sample's noise (``sample_seed(seed, key,
    k)`` for trajectory k); ``draws`` trajectories are stored per sample, from different z_T
    (K-fold job cost and output storage for K teacher outputs per crop; see
    ``distsr.teachers.cache_job``). A failed shard is tried ``retries`` more times before the
    job reports it.
    """

    # told apart by ``kind`` (distsr.registry.TEACHERS): resshift, regression (SR model files),
    # aggregated (MTKD's teachers + trained aggregator), seesr (SeeSR: SD-2-base + RAM),
    # fkdiff (FKdiff's restorer + prior diffusion: caches the sampled compact prior Z_hat)
    teacher: (
        TeacherConfig
        | RegressionTeachersConfig
        | AggregatedTeacherConfig
        | SeeSRTeacherConfig
        | FKdiffTeacherConfig
    ) = field(default_factory=TeacherConfig)
    decode: bool = False  # cache the teacher's outputs decoded to images (teachers.pixels)
    shards: list[str] = field(default_factory=list)  # dirs, globs or brace patterns of .tar files
    output: str = ""  # cache root
    batch_size: int = 16  # samples per teacher call
    num_actors: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    seed: int = 0
    draws: int = 1  # trajectories (different z_T) stored per sample; training picks one per step
    retries: int = 2

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not self.shards:
            problems.append(("shards", "needs the input shards (folders, globs or files)"))
        if not self.output:
            problems.append(("output", "needs the cache root folder"))
        for key in ("batch_size", "num_actors", "draws"):
            if getattr(self, key) < 1:
                problems.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if self.cpus_per_actor <= 0:
            problems.append(("cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}"))
        if self.retries < 0:
            problems.append(("retries", f"must be >= 0, got {self.retries}"))
        if self.seed < 0:
            problems.append(("seed", f"must be >= 0, got {self.seed}"))
        return problems
