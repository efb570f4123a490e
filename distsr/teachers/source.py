"""Where a recipe's teacher targets come from: computed now (``LiveTeacher``) or read from the
teacher-output cache next to the shards (``CachedTeacher``, DESIGN.md "TeacherSource").

Both return, for a batch with keys ``batch["__key__"]``::

    {"z0_tch":  the teacher's z0 (full trajectory from z_T = prior(z_y, eps)), METHODS.md §2.1
     "z_y":     latent of the bicubic-upsampled lq,
     "z_gt":    latent of gt,
     "noise":   the prior eps of each sample (regenerated from stable_seed(seed, key)),
     "lq_cond": the UNet condition}

as float32 on the source's device. The cache stores z0, z_y and z_gt in float16, so the live
source rounds them to float16 too, and the teacher's trajectory starts from the float16 z_y: a
target is then exactly a function of what the cache stores, ``(z_y, seed)``, and the student
builds the same z_T the teacher started from. Live and cached targets are bit-identical when the
live teacher runs the same batch on the same kind of device as the cache job did; in another
batch composition, float32 kernels may sum in another order, so a value can land on the
neighbouring float16 (1 ulp).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from distsr.data.cache import read_teacher_info
from distsr.data.shards import stable_seed
from distsr.teachers.base import Teacher, parts_differ
from distsr.teachers.resshift import lq_condition, noise_for, noise_from_seeds


class TeacherSource(Protocol):
    fingerprint: str

    def targets(self, batch: dict) -> dict[str, torch.Tensor]: ...


class LiveTeacher:
    """Runs the teacher's trajectory on every call (what public TAD-SR code does per step)."""

    def __init__(self, teacher: Teacher, seed: int):
        self.teacher = teacher
        self.seed = seed
        self.fingerprint = teacher.fingerprint()

    @torch.no_grad()
    def compute(self, batch: dict) -> dict:
        """float16 ``z0``, ``z_y``, ``z_gt`` + ``seed`` [B] (the cache fields), ``noise`` and
        ``lq_cond`` (float32), all on the teacher's device."""
        keys = list(batch["__key__"])
        teacher = self.teacher
        cond = teacher.prepare(batch["lq"])
        z_y = cond["z_y"].half()  # the stored z_y; the trajectory starts from it
        cond = {**cond, "z_y": z_y.float()}
        noise = noise_for(keys, z_y.shape[1:], self.seed, draws=teacher.noise_draws)
        noise = noise.to(z_y.device)
        z0 = teacher.sample(cond, noise).half()
        z_gt = teacher.encode_gt(batch["gt"]).half()
        seeds = torch.tensor([stable_seed(self.seed, k) for k in keys], dtype=torch.int64)
        prior_eps = noise if noise.dim() == z_y.dim() else noise[0]
        return {"z0": z0, "z_y": z_y, "z_gt": z_gt, "seed": seeds, "noise": prior_eps,
                "lq_cond": cond["lq"]}  # fmt: skip

    def cache_fields(self, batch: dict) -> dict:
        """What the cache job stores for a batch (``data.cache.write_cache_shard``)."""
        return {k: v.cpu() for k, v in self.compute(batch).items() if k in _STORED}

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.compute(batch)
        return {"z0_tch": out["z0"].float(), "z_y": out["z_y"].float(),
                "z_gt": out["z_gt"].float(), "noise": out["noise"],
                "lq_cond": out["lq_cond"]}  # fmt: skip


class CachedTeacher:
    """Reads the targets the joined reader (``data.cache.make_joined_loader``) put into
    ``batch["cache"]``; only the UNet condition is recomputed (a bicubic upsample of lq)."""

    def __init__(self, fingerprint: str, scale: int = 4, device: torch.device | str = "cpu"):
        self.fingerprint = fingerprint
        self.scale = scale
        self.device = torch.device(device)

    @classmethod
    def from_cache(cls, cache_dir: str | Path, device: torch.device | str = "cpu"):
        info = read_teacher_info(cache_dir)
        return cls(info["fingerprint"], scale=info["parts"]["scale"], device=device)

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        cache = batch.get("cache")
        if cache is None:
            raise ValueError(
                "the batch has no teacher-cache column: read the shards with "
                "distsr.data.cache.make_joined_loader(data_cfg, cache_dir, ...)"
            )
        if cache["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the batch comes from the cache of teacher {cache['fingerprint']}, but this "
                f"CachedTeacher expects {self.fingerprint}"
            )
        z = {name: cache[name].to(self.device).float() for name in ("z0", "z_y", "z_gt")}
        noise = noise_from_seeds(cache["seed"].tolist(), z["z_y"].shape[1:]).to(self.device)
        lq_cond = lq_condition(batch["lq"].to(self.device), self.scale, z["z_y"].shape[-2:])
        return {"z0_tch": z["z0"], "z_y": z["z_y"], "z_gt": z["z_gt"], "noise": noise,
                "lq_cond": lq_cond}  # fmt: skip


def check_cache(cache_dir: str | Path, teacher: Teacher) -> dict:
    """Refuse a cache written by another teacher; the error names each differing part
    (weights / sampler / schedule / scale). Returns the cache's teacher.json."""
    info = read_teacher_info(cache_dir)
    diffs = parts_differ(info.get("parts", {}), teacher.fingerprint_parts())
    if diffs:
        raise ValueError(
            f"teacher cache {cache_dir} was written by teacher {info.get('fingerprint')}, not "
            f"by the configured teacher {teacher.fingerprint()}; they differ in: "
            f"{'; '.join(diffs)}. Cache this teacher with jobs/cache_teacher.py or configure "
            "the teacher the cache was made with."
        )
    return info


_STORED = ("z0", "z_y", "z_gt", "seed")
