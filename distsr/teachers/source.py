"""Where a recipe's teacher targets come from: computed now (``LiveTeacher``) or read from the
teacher-output cache (``CachedTeacher``, DESIGN.md "TeacherSource").

Both return, for a batch (``lq``, ``gt``, ``__key__``)::

    {"cond":   the teacher's condition (``teacher.prepare``), a dict of tensors,
     "noise":  the prior eps float32 [B, ...] of z_T = prior(cond, eps), or None (a teacher
               that draws no noise, e.g. a regression net),
     "z0_tch": the teacher's output from that z_T (METHODS.md §2.1), float32; a dict
               name -> tensor for a multi-teacher (``teacher.outputs``),
     "z_gt":   gt in the teacher's target space, float32}

on the teacher's device. The cache stores the outputs, z_gt and the condition entries
``teacher.stored`` in float16, so the live source rounds them to float16 too, and the
teacher's trajectory starts from the condition rebuilt from the float16 entries: a target is
then exactly a function of what the cache stores, ``(stored, seed)``, and the student builds the
same z_T the teacher started from. Live and cached targets are bit-identical when the live
teacher uses the seeded noise (``fresh_noise=False``) and runs the same batch on the same kind of
device as the cache job did; in another batch composition, float32 kernels may sum in another
order, so a value can land on the neighbouring float16 (1 ulp).

Noise. ``LiveTeacher`` draws a fresh z_T every step by default (Algorithm 1 of TAD-SR: a new
eps each iteration). Given the training step, the fresh eps of sample ``key`` is the seeded
noise of draw ``1 + step`` (``teachers.noise.noise_for``): new every step, yet a function of
(seed, key, step) alone, so a resumed run and another process draw the same (the trainer's RNG
state, which other code also consumes, plays no part); without a step it comes from the
process's torch RNG. With ``fresh_noise=False`` sample ``key`` uses the seeded noise of draw 0 —
what the cache stores. ``CachedTeacher`` picks one of the cache's K stored trajectories per
sample and step (a hash of (key, step); without a step a ``torch.randint``) and regenerates that
trajectory's prior eps from its seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from distsr.seeding import stable_seed
from distsr.teachers.base import Teacher
from distsr.teachers.noise import noise_for, noise_from_seeds, sample_seed

if TYPE_CHECKING:
    from distsr.data.cache import TeacherCache


class TeacherSource(Protocol):
    fingerprint: str

    def targets(self, batch: dict, step: int | None = None) -> dict: ...


class LiveTeacher:
    """Runs the teacher's trajectory on every call (what public TAD-SR code does per step)."""

    def __init__(
        self,
        teacher: Teacher,
        seed: int = 0,
        *,
        fresh_noise: bool = True,
        generator: torch.Generator | None = None,
    ):
        self.teacher = teacher
        self.seed = seed
        self.fresh_noise = fresh_noise
        self.generator = generator  # None: the process's default CPU generator
        self.fingerprint = teacher.fingerprint()

    @torch.no_grad()
    def targets(self, batch: dict, step: int | None = None) -> dict:
        """``step`` (the training step) makes fresh noise a function of (seed, key, step)."""
        cond = rounded_cond(self.teacher, batch["lq"], batch["gt"])
        fresh = None if step is None or not self.fresh_noise else 1 + step
        noise = self.noise(list(batch["__key__"]), cond, draw=fresh)
        z0 = self.sample(cond, noise)
        z_gt = self.teacher.encode_gt(batch["gt"].to(self.teacher.device)).half()
        prior = None if noise is None else prior_eps(self.teacher, noise)
        return {"cond": cond, "noise": prior, "z0_tch": as_targets(self.teacher, z0),
                "z_gt": z_gt.float()}  # fmt: skip

    def noise(self, keys: list[str], cond: dict, draw: int | None = None) -> torch.Tensor | None:
        """What ``teacher.sample`` consumes for these samples: fresh noise (``fresh_noise``, no
        ``draw`` given) or the seeded noise of trajectory ``draw`` (default 0); None for a
        teacher without noise."""
        shape = self.teacher.noise_shape(cond)
        if shape is None:
            return None
        tensors = self.teacher.noise_tensors
        if draw is None and self.fresh_noise:
            noise = torch.randn((tensors, len(keys), *shape), generator=self.generator)
            noise = noise[0] if tensors == 1 else noise
        else:
            noise = noise_for(keys, shape, self.seed, tensors=tensors, draw=draw or 0)
        return noise.to(self.teacher.device)

    def sample(self, cond: dict, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The teacher's outputs as float16 ``{name: [B, ...]}`` (the cache's rounding)."""
        out = self.teacher.sample(cond, noise)
        return {name: value.half() for name, value in outputs_of(self.teacher, out).items()}

    @torch.no_grad()
    def cache_fields(self, batch: dict, draws: int = 1) -> dict[str, torch.Tensor]:
        """What the cache stores for a batch, on the CPU: the outputs float16 ``[B, K, ...]``
        (trajectory k from the seeded noise of draw k), ``z_gt`` and the ``teacher.stored``
        condition float16 ``[B, ...]``, and ``seed`` int64 ``[B, K]``."""
        keys, teacher = list(batch["__key__"]), self.teacher
        cond = rounded_cond(teacher, batch["lq"], batch["gt"])
        if draws > 1 and teacher.noise_shape(cond) is None:
            raise ValueError(
                f"draws={draws}, but teacher {self.fingerprint} draws no noise: its "
                f"{draws} outputs would be the same; set draws=1"
            )
        per_draw = [self.sample(cond, self.noise(keys, cond, draw=k)) for k in range(draws)]
        fields = {n: torch.stack([z[n] for z in per_draw], dim=1) for n in teacher.outputs}
        fields["z_gt"] = teacher.encode_gt(batch["gt"].to(teacher.device)).half()
        fields.update({name: cond[name].half() for name in teacher.stored})
        seeds = [[sample_seed(self.seed, key, k) for k in range(draws)] for key in keys]
        fields = {name: value.cpu() for name, value in fields.items()}
        return {**fields, "seed": torch.tensor(seeds, dtype=torch.int64)}


class CachedTeacher:
    """Targets from ``batch["cache"]`` (the reader's joined stream, ``make_train_loader(...,
    cache=cache)``); the condition is rebuilt from lq and the stored entries (cheap: no encoder
    call), the prior eps from the picked trajectory's seed."""

    def __init__(
        self, cache: TeacherCache, teacher: Teacher, *, generator: torch.Generator | None = None
    ):
        self.cache = cache.check(teacher)  # refuses another teacher's outputs
        self.teacher = teacher
        self.generator = generator  # None: the process's default CPU generator
        self.fingerprint = cache.fingerprint

    @torch.no_grad()
    def targets(self, batch: dict, step: int | None = None) -> dict:
        """``step`` makes the trajectory picked a function of (key, step)."""
        column = self._column(batch)
        device, seeds = self.teacher.device, column["seed"]
        rows, pick = torch.arange(seeds.shape[0]), self.pick(seeds.shape, batch["__key__"], step)
        stored = {name: column[name].to(device).float() for name in self.cache.stored}
        cond = self.teacher.prepare(batch["lq"].to(device), stored=stored)
        shape = self.teacher.noise_shape(cond)
        noise = None
        if shape is not None:  # the prior eps is tensor 0 of the trajectory's noise
            noise = noise_from_seeds(seeds[rows, pick].tolist(), shape, tensors=1).to(device)
        z0 = {name: column[name][rows, pick].to(device) for name in self.cache.outputs}
        return {"cond": cond, "noise": noise, "z0_tch": as_targets(self.teacher, z0),
                "z_gt": column["z_gt"].to(device).float()}  # fmt: skip

    def pick(self, shape: torch.Size, keys=(), step: int | None = None) -> torch.Tensor:
        """The trajectory of each sample this step: uniform over the K stored ones, a hash of
        (key, step) when the step is given, else a draw from the RNG."""
        batch, draws = shape
        if draws == 1:  # nothing to pick: the RNG stream stays as without a cache
            return torch.zeros(batch, dtype=torch.int64)
        if step is not None:
            return torch.tensor([stable_seed(key, step) % draws for key in keys])
        return torch.randint(draws, (batch,), generator=self.generator)

    def _column(self, batch: dict) -> dict:
        column = batch.get("cache")
        if column is None:
            raise ValueError(
                "the batch has no teacher-cache column: read the shards with "
                "distsr.data.reader.make_train_loader(data_cfg, ..., cache=TeacherCache(dir))"
            )
        if column["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the batch comes from the cache of teacher {column['fingerprint']}, but this "
                f"CachedTeacher reads {self.cache.path} (teacher {self.fingerprint})"
            )
        return column


def rounded_cond(teacher: Teacher, lq: torch.Tensor, gt: torch.Tensor | None = None) -> dict:
    """``teacher.prepare(lq)`` (with ``teacher.prepare_gt(gt)``'s entries), rebuilt from its
    ``stored`` entries rounded to float16 (what the cache keeps), so the trajectory starts from
    what a cached source rebuilds."""
    lq = lq.to(teacher.device)
    cond = teacher.prepare(lq)
    if gt is not None:
        cond.update(teacher.prepare_gt(gt))
    if not teacher.stored:
        return cond
    return teacher.prepare(lq, stored={n: cond[n].half().float() for n in teacher.stored})


def outputs_of(teacher: Teacher, out) -> dict[str, torch.Tensor]:
    """``teacher.sample``'s result as ``{name: tensor}`` over ``teacher.outputs``."""
    if not isinstance(out, dict):
        if len(teacher.outputs) != 1:
            raise ValueError(f"teacher {teacher.kind} has outputs {teacher.outputs}: sample "
                             "must return a dict with one entry per output")  # fmt: skip
        return {teacher.outputs[0]: out}
    if set(out) != set(teacher.outputs):
        raise ValueError(f"teacher {teacher.kind} returned {sorted(out)}, not {teacher.outputs}")
    return {name: out[name] for name in teacher.outputs}


def as_targets(teacher: Teacher, outputs: dict[str, torch.Tensor]):
    """float32 ``z0_tch``: the tensor of a single teacher, a dict for a multi-teacher."""
    out = {name: value.float() for name, value in outputs.items()}
    return out[teacher.outputs[0]] if len(teacher.outputs) == 1 else out


def prior_eps(teacher: Teacher, noise: torch.Tensor) -> torch.Tensor:
    """The prior eps (tensor 0) of what ``sample`` consumed, float32 ``[B, ...]``."""
    return (noise if teacher.noise_tensors == 1 else noise[0]).float()
