"""The teacher-output cache: one cache shard per input shard, read in lockstep with it.

Layout (``jobs/cache_teacher.py`` writes it)::

    <cache root>/<teacher fingerprint>/
        teacher.json     {"fingerprint", "parts", "noise_seed"}: which teacher, which noise
        manifest.json    {"fingerprint", "noise_seed", "shards": {name: {samples, skipped, ...}}}
        train-000000.tar the SAME names as the input shards

A cache sample is ``{__key__, z0.npy, z_y.npy, z_gt.npy, seed.txt}``: the teacher's z0 (the
full trajectory), the latents of the upsampled lq and of gt, all float16 ``[C, H, W]``, and the
per-sample noise seed ``stable_seed(noise_seed, key)`` (``teachers.resshift.noise_from_seeds``
regenerates the eps from it). Samples are in input order; input samples that fail to decode
are not cached (the job counts them in the manifest's ``skipped``).

The joined reader (``make_joined_loader``) is ``reader.make_train_loader`` with one more column:
input shard i and cache shard i are read side by side and joined by ``__key__`` before the
shuffle. An input sample missing from the cache is skipped and counted if it is corrupt (so the
job skipped it too); otherwise the pairing is wrong and a ``ValueError`` names both shard urls
and both keys. Random crops are refused: the cached latents are of the whole stored gt.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from distsr.config import ConfigError
from distsr.data.config import DataConfig
from distsr.data.reader import (
    SkipCounter,
    TrainLoader,
    _shuffle,
    _worker_index,
    check_scale,
    collate,
    decode_fields,
    iter_samples,
    list_shards,
    to_tensor,
)
from distsr.data.shards import AtomicTarWriter, stable_seed, write_json_atomic

TEACHER_JSON = "teacher.json"
MANIFEST = "manifest.json"
LATENTS = ("z0", "z_y", "z_gt")
CACHE_FIELDS = tuple(f"{name}.npy" for name in LATENTS) + ("seed.txt",)
TargetsFn = Callable[[dict], dict]  # batch -> {"z0", "z_y", "z_gt": fp16 [B,C,H,W], "seed": [B]}


# ---------------------------------------------------------------- folder, names, metadata


def cache_dir_for(root: str | Path, fingerprint: str) -> Path:
    return Path(root).expanduser() / fingerprint


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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_teacher_info(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / TEACHER_JSON
    info = read_json(path)
    if info is None:
        raise ValueError(f"{cache_dir} is not a teacher cache: {TEACHER_JSON} is missing")
    return info


def write_teacher_info(cache_dir: Path, fingerprint: str, parts: dict, noise_seed: int) -> None:
    info = {"fingerprint": fingerprint, "parts": parts, "noise_seed": noise_seed}
    write_json_atomic(cache_dir / TEACHER_JSON, info)


def read_manifest(cache_dir: str | Path) -> dict:
    return read_json(Path(cache_dir) / MANIFEST) or {"shards": {}}


def finished_shards(cache_dir: str | Path) -> dict[str, dict]:
    """Shards listed in the manifest whose file exists (a rename always precedes the listing)."""
    cache_dir = Path(cache_dir)
    shards = read_manifest(cache_dir).get("shards", {})
    return {name: info for name, info in shards.items() if (cache_dir / name).is_file()}


def record_finished(cache_dir: Path, name: str, entry: dict, header: dict) -> dict:
    """Add a finished shard to ``manifest.json`` (atomic replace); returns the manifest."""
    manifest = read_manifest(cache_dir)
    manifest.update(header)
    manifest.setdefault("shards", {})[name] = entry
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"].values())
    write_json_atomic(cache_dir / MANIFEST, manifest)
    return manifest


def remove_temp_files(cache_dir: Path) -> list[str]:
    """Delete leftovers of interrupted writers (``*.tmp``); returns their names."""
    stale = sorted(cache_dir.glob("*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


# ---------------------------------------------------------------- writing one cache shard


class CacheShardWriter(AtomicTarWriter):
    """``AtomicTarWriter`` with a unique temp name, so a writer left over from a killed run can
    never share a temp file with the writer of a re-run."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_cache_sample(key: str, fields: dict, i: int) -> dict:
    """Sample ``i`` of a targets batch -> tar members (latents as float16 .npy)."""
    sample = {"__key__": key, "seed.txt": str(int(fields["seed"][i])).encode()}
    for name in LATENTS:
        value = fields[name][i]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        sample[f"{name}.npy"] = npy_bytes(np.ascontiguousarray(value, dtype=np.float16))
    return sample


def decode_cache_fields(sample: dict) -> dict:
    missing = [f for f in CACHE_FIELDS if f not in sample]
    if missing:
        raise ValueError(f"cache sample lacks {', '.join(missing)}")
    out = {name: np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False) for name in LATENTS}
    bad = [n for n, v in out.items() if v.dtype != np.float16 or v.ndim != 3]
    if bad:
        raise ValueError(f"cache fields {bad} are not float16 [C, H, W]")
    out["seed"] = int(sample["seed.txt"])
    return out


def write_cache_shard(
    url: str, path: Path, targets_fn: TargetsFn, *, batch_size: int, scale: int
) -> dict:
    """Run ``targets_fn`` over every decodable sample of input shard ``url`` (in order, in
    batches) and write cache shard ``path`` atomically. Returns the manifest entry. Corrupt
    samples are skipped and counted, as the joined reader skips them; a shard without any
    readable sample raises (it may be a transient read error, so it is not cached empty)."""
    counter = SkipCounter()
    samples, gt_hw, latent = 0, None, None
    with CacheShardWriter(path) as sink:
        for batch in _batches(iter_samples(url, scale=scale, counter=counter), batch_size):
            fields = targets_fn(batch)
            for i, key in enumerate(batch["__key__"]):
                sink.write(encode_cache_sample(key, fields, i))
            samples += len(batch["__key__"])
            gt_hw, latent = list(batch["gt"].shape[-2:]), list(fields["z0"].shape[1:])
        if samples == 0:  # raising discards the temp file: the job retries, then reports it
            raise ValueError(f"input shard {url} has no readable sample ({counter.total} errors)")
    return {"samples": samples, "skipped": counter.total, "input": url, "gt_size": gt_hw,
            "latent_shape": latent}  # fmt: skip


def _batches(samples: Iterator[dict], batch_size: int) -> Iterator[dict]:
    group: list[dict] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group:
        yield collate(group)


# ---------------------------------------------------------------- the joined reader


def _read_tar(url: str, counter: SkipCounter, failed: list) -> Iterator[dict]:
    """Raw samples of one shard; a read error is counted once and recorded in ``failed``."""

    def handler(exn: Exception) -> bool:
        if not failed:
            counter.skip(url, None, f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        failed.append(exn)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=handler)


def _is_corrupt(sample: dict) -> str | None:
    try:
        decode_fields(sample)
    except Exception as err:  # any decoder error: the cache job skipped this sample too
        return f"{type(err).__name__}: {err}"
    return None


def _join_shard(url: str, cache_url: str, counter: SkipCounter) -> Iterator[dict]:
    """Input and cache samples of one shard pair, joined by key (see the module doc)."""
    in_failed, cache_failed = [], []
    cache = _read_tar(cache_url, counter, cache_failed)
    cached = next(cache, None)
    for sample in _read_tar(url, counter, in_failed):
        key = sample["__key__"]
        if cached is not None and cached["__key__"] == key:
            yield {**sample, **{f: cached[f] for f in CACHE_FIELDS if f in cached},
                   "__cache_url__": cache_url}  # fmt: skip
            cached = next(cache, None)
            continue
        reason = _is_corrupt(sample)
        if reason is not None:
            counter.skip(url, key, reason)
        elif cached is None and cache_failed:
            return  # the cache shard is unreadable from here on (counted once)
        else:
            other = "nothing (the cache shard ended)" if cached is None else cached["__key__"]
            raise ValueError(
                f"teacher cache out of step with the input: input shard {url} has sample {key} "
                f"where cache shard {cache_url} has {other}; re-run jobs/cache_teacher.py on "
                "these shards"
            )
    if cached is not None and not in_failed:
        raise ValueError(
            f"teacher cache out of step with the input: cache shard {cache_url} has sample "
            f"{cached['__key__']} after the last sample of input shard {url}"
        )


def _read_joined(src, counter: SkipCounter, cache_dir: Path):
    for item in src:
        counter.shard_opened(item["url"])
        yield from _join_shard(item["url"], str(cache_dir / shard_name(item["url"])), counter)


def _decode_joined(src, counter: SkipCounter, scale: int, gt_size: int | None):
    """Joined raw samples -> ``{__key__, __url__, gt, lq, meta, z0, z_y, z_gt, seed}``."""
    for sample in src:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            gt, lq, meta = decode_fields(sample)
            cached = decode_cache_fields(sample)
        except Exception as err:  # any decoder error: the pair is corrupt
            counter.skip(url, key, f"{type(err).__name__}: {err}")
            continue
        check_scale(gt, lq, scale, f"shard {url} sample {key}")
        check_gt_size(gt_size, gt.shape[:2], f"shard {url} sample {key}")
        counter.good()
        latents = {name: torch.from_numpy(cached[name]) for name in LATENTS}
        yield {"__key__": key, "__url__": url, "gt": to_tensor(gt), "lq": to_tensor(lq),
               "meta": meta, "seed": cached["seed"], **latents}  # fmt: skip


def check_gt_size(gt_size: int | None, stored_hw: Sequence[int], where: str) -> None:
    if gt_size is not None and tuple(stored_hw) != (gt_size, gt_size):
        raise ValueError(
            f"{where}: data.gt_size={gt_size} would random-crop the stored {stored_hw[1]}x"
            f"{stored_hw[0]} gt, but the teacher cache holds latents of the whole stored gt; "
            "set data.gt_size=null (or the stored size) when reading with a teacher cache"
        )


def collate_joined(samples: list[dict], skipped: int = 0, fingerprint: str = "") -> dict:
    """``reader.collate`` + ``batch["cache"] = {z0, z_y, z_gt (float16 [B,C,H,W]), seed [B],
    fingerprint}``."""
    batch = collate(samples, skipped=skipped)
    cache = {name: torch.stack([s[name] for s in samples]) for name in LATENTS}
    cache["seed"] = torch.tensor([s["seed"] for s in samples], dtype=torch.int64)
    batch["cache"] = {**cache, "fingerprint": fingerprint}
    return batch


def _batch_joined(src, counter: SkipCounter, batch_size: int, fingerprint: str):
    for group in iter(lambda: [s for _, s in zip(range(batch_size), src)], []):
        if len(group) == batch_size:
            yield collate_joined(group, skipped=counter.take(), fingerprint=fingerprint)


def check_cache_covers(cache_dir: Path, urls: list[str], gt_size: int | None) -> str:
    """The cache's fingerprint, after checking it holds a finished shard for every input."""
    info = read_teacher_info(cache_dir)
    done = finished_shards(cache_dir)
    missing = [name for name in shard_names(urls) if name not in done]
    if missing:
        raise ValueError(
            f"teacher cache {cache_dir} lacks {len(missing)} of {len(urls)} input shard(s) "
            f"(e.g. {', '.join(missing[:3])}): run jobs/cache_teacher.py on data.shards first"
        )
    for name in shard_names(urls):
        if done[name].get("gt_size"):
            check_gt_size(gt_size, done[name]["gt_size"], f"cache shard {name}")
    return info["fingerprint"]


def make_joined_loader(
    data_cfg: DataConfig,
    cache_dir: str | Path,
    *,
    rank: int,
    world_size: int,
    steps: int,
    seed: int,
    start_step: int = 0,
) -> TrainLoader:
    """``reader.make_train_loader`` whose batches also carry ``batch["cache"]`` (see
    ``collate_joined``): exactly ``steps`` batches per rank from resampled shard pairs."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    problems = data_cfg.validate()
    if problems:
        raise ConfigError([(f"data.{key}", msg) for key, msg in problems], "data config")
    cache_dir = Path(cache_dir).expanduser()
    urls = list_shards(data_cfg.shards)
    fingerprint = check_cache_covers(cache_dir, urls, data_cfg.gt_size)
    stream_seed = stable_seed(seed, rank, start_step)
    workers = max(data_cfg.num_workers, 1)
    counter = SkipCounter(max_dry=1000 + data_cfg.shuffle)
    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, seed=stream_seed, worker_seed=_worker_index, deterministic=True),
        functools.partial(_read_joined, counter=counter, cache_dir=cache_dir),
        functools.partial(_shuffle, bufsize=data_cfg.shuffle, seed=stream_seed),
        functools.partial(
            _decode_joined, counter=counter, scale=data_cfg.scale, gt_size=data_cfg.gt_size
        ),
        functools.partial(
            _batch_joined, counter=counter, batch_size=data_cfg.batch_size, fingerprint=fingerprint
        ),
    ).with_epoch(nbatches=math.ceil(steps / workers))
    return TrainLoader(dataset, steps, data_cfg.num_workers)
