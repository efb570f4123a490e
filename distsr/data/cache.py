"""The teacher-output cache: one cache shard per input shard, read in lockstep with it.

Layout (``jobs/cache_teacher.py`` writes it)::

    <cache root>/<teacher fingerprint>/
        teacher.json     {"format", "fingerprint", "parts", "noise_seed", "draws", "outputs",
                          "stored", "fields"}: which teacher, which noise, which fields
        manifest.json    {"fingerprint", "noise_seed", "draws", "samples",
                          "shards": {name: {samples, skipped, input, gt_size, shapes, seconds}}}
        train-000000.tar the SAME names as the input shards

A cache sample holds generic named fields, all float16 ``.npy``: the teacher's outputs
(``teacher.outputs``, e.g. ``z0``, or ``z0.swinir`` and ``z0.edsr`` for a multi-teacher), each
``[K, ...]`` with one entry per trajectory (``draws: K``), then ``z_gt`` (gt in the teacher's
target space) and the condition entries ``teacher.prepare`` rebuilds the rest from
(``teacher.stored``, e.g. ``z_y``), each ``[...]``; and ``seed.npy``, int64 ``[K]``: the noise
seed of each trajectory (``teachers.noise.sample_seed(noise_seed, key, k)``; the prior eps is
regenerated from it). Samples are in input order; input samples that fail to decode are not
cached (the job counts them in the manifest's ``skipped``).

**Validity.** ``TeacherCache.check(teacher)`` refuses a cache written by another teacher and
names each differing fingerprint part. ``TeacherCache.check_inputs(urls)`` refuses input shards
that the cache holds no finished shard for, and input shards whose *content* differs from the
one the cache shard was made from, though the name is the same: the manifest records each input
shard's size, the fingerprint of its shard folder (``manifest.json`` of ``make_shards``) and its
sha256. At the start of training the size is compared, then the shard-folder fingerprint when
both have one (cheap; equal fingerprints mean the same deterministic shard bytes); otherwise the
shard file is hashed. Input shards and the cache may be on object storage (``s3://``, see
``data.storage``: checked the same way); other remote shards (``pipe:``, ``http://``...) are
checked by name only.

**Draws.** ``draws: K`` stores K trajectories per crop, from K different z_T; training picks one
per step and sample (``teachers.source.CachedTeacher``). The cache job's cost and the cache's size
grow K-fold in the outputs (the stored condition and z_gt are stored once); in exchange the
student sees K teacher outputs per crop instead of one, closer to the live teacher's fresh z_T
per step (Algorithm 1). K = 1 is the cheap default: one z_T per crop, repeated every time the
crop comes back.

The joined reading is a stage of the one training pipeline (``reader.make_train_loader(...,
cache=TeacherCache(dir))``): input shard i and cache shard i are read side by side and joined
by ``__key__`` before the shuffle, and batches carry ``batch["cache"]``.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from distsr.data import storage
from distsr.data.reader import SkipCounter, collate, iter_samples
from distsr.data.shards import AtomicTarWriter, write_json_atomic
from distsr.fingerprint import fingerprint_of, parts_differ

TEACHER_JSON = "teacher.json"
MANIFEST = "manifest.json"
FORMAT = 2  # teacher.json "format": 2 = generic named fields + draws
SEED = "seed"  # the per-sample noise seeds, int64 [K]
GT = "z_gt"
FieldsFn = Callable[[dict], dict]  # batch -> {output: [B, K, ...], z_gt/stored: [B, ...], seed}


# ---------------------------------------------------------------- folder, names, metadata


def cache_dir_for(root: str | Path, fingerprint: str) -> Path | str:
    return storage.child(root, fingerprint)


def shard_name(url: str) -> str:
    """The cache shard name of an input shard url: its file name."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def shard_names(urls: Sequence[str]) -> list[str]:
    names = [shard_name(u) for u in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names):
        if name in seen:
            raise ValueError(
                f"input shards {seen[name]} and {url} share the name {name}: cache shards are "
                "named after their input shard, so input shard names must be unique"
            )
        seen[name] = url
    return names


read_json = storage.read_json  # None when the file does not exist


# ---------------------------------------------------------------- input shard identity


def input_identity(url: str, content: bool = True) -> dict:
    """What identifies input shard ``url``'s content: ``{url, bytes, shards_fingerprint (the
    fingerprint in the shard folder's manifest.json, if it lists this shard), sha256 (with
    content)}``; a url that is not a file here or on object storage: ``{url}`` only."""
    size = storage.size(url)
    if size is None:
        return {"url": url}
    identity = {"url": url, "bytes": size}
    folder = read_json(storage.join(storage.parent(url), MANIFEST)) or {}
    listed = {s.get("name") for s in folder.get("shards", []) if isinstance(s, dict)}
    if folder.get("fingerprint") and storage.name(url) in listed:
        identity["shards_fingerprint"] = folder["fingerprint"]
    if content:
        identity["sha256"] = file_sha256(url)
    return identity


file_sha256 = storage.sha256


def same_input(recorded: dict, url: str) -> tuple[bool, dict]:
    """Whether ``url`` holds the content ``recorded`` describes (see the module doc), and what
    was looked at (for the message)."""
    now = input_identity(url, content=False)
    if "bytes" not in recorded or "bytes" not in now:
        return True, now  # a remote shard: the name is all there is
    if recorded["bytes"] != now["bytes"]:
        return False, now
    fingerprint = recorded.get("shards_fingerprint")
    if fingerprint and fingerprint == now.get("shards_fingerprint"):
        return True, now
    now["sha256"] = file_sha256(url)
    return recorded.get("sha256") == now["sha256"], now


def _describe(identity: dict) -> str:
    parts = [f"{identity['bytes']} bytes"] if "bytes" in identity else []
    if identity.get("shards_fingerprint"):
        parts.append(f"shards fingerprint {identity['shards_fingerprint'][:12]}")
    if identity.get("sha256"):
        parts.append(f"sha256 {identity['sha256'][:12]}")
    return f"{identity.get('url')} ({', '.join(parts) or 'no identity recorded'})"


# ---------------------------------------------------------------- the cache folder


class TeacherCache:
    """An existing cache folder: ``teacher.json`` read once, then checks and the joined stream.

    * ``check(teacher)`` / ``check_parts(parts)``: refuse another teacher (each differing
      fingerprint part named) or other fields;
    * ``check_inputs(urls, gt_size)``: every input shard has a finished cache shard made from
      the same content, and no random crop is asked for;
    * ``shard_path(url)``, ``decode(members)``: used by the joined stage of
      ``reader.make_train_loader(..., cache=self)``.
    """

    def __init__(self, path: str | Path):
        self.path = path if storage.is_remote(path) else Path(path).expanduser()
        info = read_json(storage.child(self.path, TEACHER_JSON))
        if info is None:
            raise ValueError(
                f"{path} is not a teacher cache: {TEACHER_JSON} is missing (jobs/cache_teacher.py "
                "writes it into <output>/<teacher fingerprint>/)"
            )
        if info.get("format") != FORMAT:
            raise ValueError(
                f"teacher cache {path} has format {info.get('format', 1)}, this version reads "
                f"format {FORMAT}: re-run jobs/cache_teacher.py into a new output folder"
            )
        self.info = info
        self.fingerprint: str = info["fingerprint"]
        self.parts: dict = info["parts"]
        self.noise_seed: int = info["noise_seed"]
        self.draws: int = info["draws"]
        self.outputs: tuple[str, ...] = tuple(info["outputs"])
        self.stored: tuple[str, ...] = tuple(info["stored"])

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r})"

    @property
    def image_space(self) -> bool:
        """Whether the cached outputs and z_gt are images (so ``data.augment`` may flip/rotate
        them with lq and gt): see ``image_space_parts``."""
        return image_space_parts(self.parts)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every float16 field of a sample: the outputs ([K, ...]), z_gt and the stored cond."""
        return (*self.outputs, GT, *self.stored)

    @classmethod
    def create(
        cls,
        root: str | Path,
        parts: dict,
        *,
        noise_seed: int,
        draws: int,
        outputs: Sequence[str],
        stored: Sequence[str],
    ) -> TeacherCache:
        """Open ``root/<fingerprint>`` for writing, creating it (and its teacher.json) if new;
        an existing one must hold this teacher's outputs with the same noise seed and draws."""
        fingerprint = fingerprint_of(parts)
        path = cache_dir_for(root, fingerprint)
        outputs, stored = list(outputs), list(stored)
        check_field_names([*outputs, GT, *stored])
        if not storage.exists(storage.child(path, TEACHER_JSON)):
            info = {"format": FORMAT, "fingerprint": fingerprint, "parts": parts,
                    "noise_seed": noise_seed, "draws": draws, "outputs": outputs,
                    "stored": stored, "fields": [*outputs, GT, *stored]}  # fmt: skip
            write_json_atomic(storage.child(path, TEACHER_JSON), info)
        cache = cls(path).check_parts(parts)
        cache.check_fields(outputs, stored)
        for key, value in (("noise_seed", noise_seed), ("draws", draws)):
            if cache.info[key] != value:
                raise ValueError(
                    f"{path} was cached with {key}={cache.info[key]}, this run has {key}={value}: "
                    f"use that {key} or another output folder"
                )
        return cache

    # ---- which teacher ----------------------------------------------------------------------
    def check(self, teacher) -> TeacherCache:
        """Refuse a cache written by another teacher (``teachers.base.Teacher``)."""
        self.check_parts(teacher.fingerprint_parts())
        return self.check_fields(teacher.outputs, teacher.stored)

    def check_parts(self, parts: dict) -> TeacherCache:
        diffs = parts_differ(self.parts, parts)
        if diffs:
            raise ValueError(
                f"teacher cache {self.path} was written by teacher {self.fingerprint}, not by "
                f"the configured teacher {fingerprint_of(parts)}; they differ in: "
                f"{'; '.join(diffs)}. Cache this teacher with jobs/cache_teacher.py or configure "
                "the teacher the cache was made with."
            )
        return self

    def check_fields(self, outputs: Sequence[str], stored: Sequence[str]) -> TeacherCache:
        if (tuple(outputs), tuple(stored)) != (self.outputs, self.stored):
            raise ValueError(
                f"teacher cache {self.path} holds outputs {list(self.outputs)} and condition "
                f"{list(self.stored)}, the teacher gives {list(outputs)} and {list(stored)}"
            )
        return self

    # ---- which shards -----------------------------------------------------------------------
    def manifest(self) -> dict:
        """``manifest.json`` as it is now (the job updates it after every shard)."""
        return read_json(storage.child(self.path, MANIFEST)) or {"shards": {}}

    def finished(self) -> dict[str, dict]:
        """Shards listed in the manifest whose file exists (a rename precedes the listing)."""
        shards = self.manifest().get("shards", {})
        present = set(storage.listdir(self.path))
        return {name: e for name, e in shards.items() if name in present}

    def shard_path(self, url: str) -> Path | str:
        return storage.child(self.path, shard_name(url))

    def input_problems(self, urls: Sequence[str], done: dict[str, dict]) -> list[str]:
        """One line per url whose finished cache shard was made from other content."""
        problems = []
        for url in urls:
            recorded = done[shard_name(url)].get("input") or {}
            same, now = same_input(recorded, url)
            if not same:
                problems.append(
                    f"cache shard {shard_name(url)} was made from input shard "
                    f"{_describe(recorded)}, but the input shard now is {_describe(now)}"
                )
        return problems

    def check_inputs(self, urls: Sequence[str], gt_size: int | None = None) -> None:
        """Refuse unless every input shard has a finished cache shard of the same content and
        ``gt_size`` does not random-crop the stored gt (the cache holds the whole crop's)."""
        done = self.finished()
        names = shard_names(urls)
        missing = [name for name in names if name not in done]
        if missing:
            raise ValueError(
                f"teacher cache {self.path} lacks {len(missing)} of {len(urls)} input shard(s) "
                f"(e.g. {', '.join(missing[:3])}): run jobs/cache_teacher.py on data.shards first"
            )
        problems = self.input_problems(urls, done)
        if problems:
            raise ValueError(
                f"teacher cache {self.path} was made from other input shards under the same "
                f"names: {'; '.join(problems)}. Train on the shards the cache was made from, or "
                "cache these shards (jobs/cache_teacher.py with another output folder)."
            )
        for name in names:
            stored_hw = done[name].get("gt_size")
            if gt_size is not None and stored_hw and tuple(stored_hw) != (gt_size, gt_size):
                raise ValueError(
                    f"cache shard {name}: data.gt_size={gt_size} would random-crop the stored "
                    f"{stored_hw[1]}x{stored_hw[0]} gt, but the teacher cache holds targets of "
                    "the whole stored gt; set data.gt_size=null (or the stored size) when "
                    "reading with a teacher cache"
                )

    # ---- samples ----------------------------------------------------------------------------
    def decode(self, members: dict[str, bytes]) -> dict[str, torch.Tensor]:
        """Tar members of one cache sample -> ``{field: float16 tensor, "seed": int64 [K]}``."""
        missing = [f"{n}.npy" for n in (*self.fields, SEED) if f"{n}.npy" not in members]
        if missing:
            raise ValueError(f"cache sample lacks {', '.join(missing)}")
        out = {name: _load_npy(members[f"{name}.npy"]) for name in (*self.fields, SEED)}
        bad = [n for n in self.fields if out[n].dtype != np.float16]
        bad += [n for n in self.outputs if out[n].ndim < 1 or out[n].shape[0] != self.draws]
        if out[SEED].dtype != np.int64 or out[SEED].shape != (self.draws,):
            bad.append(SEED)
        if bad:
            raise ValueError(
                f"cache fields {sorted(set(bad))} do not have the cache's layout (float16; "
                f"outputs and seed with {self.draws} draw(s) first)"
            )
        return {name: torch.from_numpy(value) for name, value in out.items()}

    # ---- writing (the cache job) ------------------------------------------------------------
    def record(self, name: str, entry: dict) -> dict:
        """Add a finished shard to ``manifest.json`` (atomic replace); returns the manifest."""
        manifest = self.manifest()
        manifest.update(fingerprint=self.fingerprint, noise_seed=self.noise_seed, draws=self.draws)
        manifest.setdefault("shards", {})[name] = entry
        manifest["samples"] = sum(s["samples"] for s in manifest["shards"].values())
        write_json_atomic(storage.child(self.path, MANIFEST), manifest)
        return manifest

    def remove_temp_files(self) -> list[str]:
        """Delete leftovers of interrupted writers (``*.tmp``); returns their names (none on
        object storage: an interrupted upload leaves no object)."""
        if storage.is_remote(self.path):
            return []
        stale = sorted(self.path.glob("*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return [p.name for p in stale]

    def write_shard(
        self, url: str, fields_fn: FieldsFn, *, batch_size: int, scale: int | None
    ) -> dict:
        """Run ``fields_fn`` over every decodable sample of input shard ``url`` (in order, in
        batches) and write its cache shard atomically. Returns the manifest entry. Corrupt
        samples are skipped and counted, as the joined reader skips them; a shard without any
        readable sample raises (it may be a transient read error, so it is not cached empty)."""
        identity = input_identity(url)
        counter = SkipCounter()
        samples, gt_hw, shapes = 0, None, {}
        with CacheShardWriter(self.shard_path(url)) as sink:
            for batch in _batches(iter_samples(url, scale=scale, counter=counter), batch_size):
                fields = fields_fn(batch)
                for i, key in enumerate(batch["__key__"]):
                    sink.write(self.encode(key, fields, i))
                samples += len(batch["__key__"])
                gt_hw = list(batch["gt"].shape[-2:])
                shapes = {n: list(fields[n].shape[1:]) for n in self.fields}
            if samples == 0:  # raising discards the temp file: the job retries, then reports it
                raise ValueError(
                    f"input shard {url} has no readable sample ({counter.total} errors)"
                )
        return {"samples": samples, "skipped": counter.total, "input": identity,
                "gt_size": gt_hw, "shapes": shapes}  # fmt: skip

    def encode(self, key: str, fields: dict, i: int) -> dict:
        """Sample ``i`` of a fields batch -> tar members (see the module doc)."""
        members = {"__key__": key}
        for name in self.fields:
            members[f"{name}.npy"] = _npy_bytes(fields[name][i], np.float16)
        members[f"{SEED}.npy"] = _npy_bytes(fields[SEED][i], np.int64)
        return members


def image_space_parts(parts: dict) -> bool:
    """Teacher fingerprint parts whose outputs are images: regression nets, the MTKD aggregated
    teacher, several of them (``multi``), and ResShift or regression decoded to pixels (DTKD;
    its stored ``z_y`` is the VQ-f4 latent of lq, laid out like lq, which the output-KD recipes
    do not read). Latent diffusion (resshift, seesr) and FKdiff caches are not."""
    kind = parts.get("kind")
    if kind == "multi":
        return all(image_space_parts(p) for p in parts["teachers"].values())
    if kind == "pixels":
        return parts["teacher"].get("kind") in ("resshift", "regression")
    return kind in ("regression", "aggregated")


def check_field_names(names: Sequence[str]) -> None:
    """Field names become tar member names ``<key>.<name>.npy``: no clashes, no path parts."""
    bad = [n for n in names if not n or "/" in n or n == SEED or n.startswith(".")]
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if bad or dupes:
        raise ValueError(f"teacher cache field names {list(names)}: bad {bad}, repeated {dupes}")


class CacheShardWriter(AtomicTarWriter):
    """``AtomicTarWriter`` with a unique temp name, so a writer left over from a killed run can
    never share a temp file with the writer of a re-run."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _npy_bytes(value, dtype) -> bytes:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(value, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _batches(samples: Iterator[dict], batch_size: int) -> Iterator[dict]:
    group: list[dict] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group:
        yield collate(group)
