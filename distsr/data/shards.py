"""Training shards: image folders -> ``gt`` crops -> ``degrade`` -> WebDataset tar shards.

A sample is ``{__key__, gt.png, lq.png, meta.json}``. Everything is deterministic, so an
interrupted job can be re-run and only re-creates what is missing, byte for byte:

* images are listed in a stable order (inputs in order, each one sorted), and each image gets
  a key from its file stem (``-2``, ``-3``... when stems repeat);
* crops are planned from image sizes only (random crops draw from a seed per image); sample
  ``i`` of the plan is ``<image-key>_<crop-index>`` and goes into shard ``i // shard_size``;
* each sample's degradation seed is ``stable_seed(cfg.seed, key)`` (a hash, not ``hash()``);
* a shard is written to ``NAME.tar.tmp``, fsynced and renamed (on object storage: uploaded
  from a local temp file), so ``NAME.tar`` only exists complete; ``manifest.json`` (written
  at the start with ``complete: false`` and atomically replaced at the end) holds a fingerprint
  of the plan, so a re-run with a different config or image set into the same folder is
  refused instead of mixing two plans.

``output`` is a folder or an ``s3://bucket/prefix`` URL (``data.storage``); inputs are local.

Unreadable images are logged (with their path), skipped, and listed in the manifest's
``bad_images``: those found while planning (header/CRC check) on every run, those that only
fail to decode while writing for the shards written by that run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from distsr.config import ConfigError, to_dict
from distsr.data import storage
from distsr.data.config import ShardsConfig
from distsr.data.degradation import degrade
from distsr.data.imageio import list_images
from distsr.seeding import stable_seed

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_NOT_IN_FINGERPRINT = ("inputs", "output", "workers")  # where things are, not what they are


@dataclass(frozen=True)
class Crop:
    key: str  # sample key, ``<image-key>_<crop-index>``
    image: str  # path of the source image
    top: int
    left: int


@dataclass
class Plan:
    crops: list[Crop] = field(default_factory=list)
    images: int = 0  # images that gave crops
    bad: list[dict] = field(default_factory=list)  # {"path", "error"} of unreadable images
    too_small: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- planning


def image_keys(paths: list[Path]) -> list[str]:
    """WebDataset-safe keys (no dots) from file stems, made unique in list order."""
    keys: list[str] = []
    used: set[str] = set()
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "image"
        key = base
        for n in itertools.count(2):
            if key not in used:
                break
            key = f"{base}-{n}"
        used.add(key)
        keys.append(key)
    return keys


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header; raises on files PIL cannot identify or verify."""
    with Image.open(path) as img:
        size = img.size
        img.verify()  # checks PNG chunk CRCs (truncation, garbage) without decoding pixels
    return size


def grid_starts(length: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # cover the border
    return starts


def crop_boxes(height: int, width: int, cfg: ShardsConfig, image_key: str) -> list[tuple]:
    """``(top, left)`` of every crop of one image (grid, or seeded random positions)."""
    size = cfg.crop_size
    if cfg.crop_mode == "random":
        rng = np.random.default_rng(stable_seed(cfg.seed, image_key, "crops"))
        tops = rng.integers(0, height - size, size=cfg.random_crops, endpoint=True)
        lefts = rng.integers(0, width - size, size=cfg.random_crops, endpoint=True)
        return list(zip(tops.tolist(), lefts.tolist()))
    stride = cfg.stride or size
    return [
        (top, left)
        for top in grid_starts(height, size, stride)
        for left in grid_starts(width, size, stride)
    ]


def plan_crops(cfg: ShardsConfig) -> Plan:
    """List images, read their sizes, and plan every crop (unreadable/small images skipped)."""
    paths = list_images(cfg.inputs, cfg.extensions)
    min_side = max(cfg.min_size, cfg.crop_size)
    plan = Plan()
    for path, key in zip(paths, image_keys(paths)):
        try:
            width, height = image_size(path)
        except Exception as err:  # any decoder error: report the file and go on
            plan.bad.append(_report_bad(path, err))
            continue
        if min(width, height) < min_side:
            plan.too_small.append(str(path))
            continue
        boxes = crop_boxes(height, width, cfg, key)
        plan.crops += [Crop(f"{key}_{i:04d}", str(path), t, l) for i, (t, l) in enumerate(boxes)]
        plan.images += 1
    if plan.too_small:
        log.info("skipped %d image(s) smaller than %d px", len(plan.too_small), min_side)
    if cfg.shuffle:  # mix every image's crops across all shards (seeded, so resumable)
        order = np.random.default_rng(stable_seed(cfg.seed, "shuffle")).permutation(len(plan.crops))
        plan.crops = [plan.crops[i] for i in order]
    return plan


def _report_bad(path, err: Exception) -> dict:
    log.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
    return {"path": str(path), "error": f"{type(err).__name__}: {err}"}


def fingerprint(cfg: ShardsConfig, crops: list[Crop]) -> str:
    """Hash of what the shards hold: config (not paths/workers) + every crop and its image."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for crop in crops:
        h.update(f"{crop.key}|{Path(crop.image).name}|{crop.top}|{crop.left}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- writing


class AtomicTarWriter:
    """``webdataset.TarWriter`` into ``NAME.tar.tmp``; on a clean exit: fsync, rename to
    ``NAME.tar``; on an exception the temp file is removed. Fixed mtime: reproducible bytes.
    A ``path`` on object storage is written to a local temp file, uploaded on a clean exit."""

    def __init__(self, path: str | Path):
        self.url = path if storage.is_remote(path) else None
        self.path = Path(storage.name(path)) if self.url else Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def __enter__(self) -> AtomicTarWriter:
        if self.url:
            self.tmp = storage.temp_file(".tar")
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        return self

    def write(self, sample: dict) -> None:
        self._tar.write(sample)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is not None or self.url:
            try:
                if exc_type is None:
                    storage.put_file(self.tmp, self.url)
            finally:
                self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)


fsync_dir = storage.fsync_dir
write_json_atomic = storage.write_json  # a folder's file or an object, all or nothing


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jsonable(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value {value!r} is not JSON-serialisable")


def encode_sample(key: str, gt: np.ndarray, lq: np.ndarray, meta: dict) -> dict:
    meta_json = json.dumps(meta, sort_keys=True, default=_jsonable)
    return {"__key__": key, "gt.png": png_bytes(gt), "lq.png": png_bytes(lq),
            "meta.json": meta_json.encode()}  # fmt: skip


def cut_crops(path: str, crops: list[Crop], size: int) -> list[np.ndarray]:
    """Decode one image (as RGB) and cut its planned crops."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    gts = [rgb[c.top : c.top + size, c.left : c.left + size] for c in crops]
    if any(gt.shape[:2] != (size, size) for gt in gts):
        raise ValueError(f"decoded size {rgb.shape[1]}x{rgb.shape[0]} does not fit the plan")
    return gts


def write_shard(cfg: ShardsConfig, path: Path | str, crops: list[Crop]) -> dict:
    """Write one shard atomically, in the planned order; each image is decoded once (its crops are
    cut, then written where the plan puts them). An image that fails to decode loses its crops
    (reported)."""
    gts, bad = {}, []
    for image, group in itertools.groupby(sorted(crops, key=lambda c: c.image), lambda c: c.image):
        group = list(group)
        try:
            gts.update(zip((c.key for c in group), cut_crops(image, group, cfg.crop_size)))
        except Exception as err:  # any decoder error: report the file and go on
            bad.append({"path": image, "error": f"{type(err).__name__}: {err}"})
    count = 0
    with AtomicTarWriter(path) as sink:
        for crop in crops:
            if crop.key not in gts:
                continue
            gt = gts.pop(crop.key)
            lq, meta = degrade(gt, cfg.degradation, seed=stable_seed(cfg.seed, crop.key))
            meta["crop"] = {"image": Path(crop.image).name, "top": crop.top, "left": crop.left}
            sink.write(encode_sample(crop.key, gt, lq, meta))
            count += 1
    return {"name": storage.name(path), "samples": count, "bad": bad}


def count_samples(path: str | Path) -> int:
    """Number of distinct keys in a finished shard (local or on object storage)."""
    with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return len({member.name.split(".", 1)[0] for member in tar})


# ---------------------------------------------------------------- the job


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def make_shards(cfg: ShardsConfig, progress: bool = True) -> dict:
    """Plan, write the missing shards, and return (and write) ``manifest.json``."""
    problems = cfg.validate() + [(f"degradation.{k}", m) for k, m in cfg.degradation.all_problems()]
    if problems:
        raise ConfigError(problems, "shards config")
    out = cfg.output if storage.is_remote(cfg.output) else Path(cfg.output).expanduser()
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    plan = plan_crops(cfg)
    if not plan.crops:
        raise ValueError(
            f"no crops to write: {len(plan.bad)} unreadable and {len(plan.too_small)} too small "
            f"image(s) (need >= {max(cfg.min_size, cfg.crop_size)} px per side)"
        )
    groups = [plan.crops[i : i + cfg.shard_size] for i in range(0, len(plan.crops), cfg.shard_size)]
    names = [shard_name(cfg.prefix, i) for i in range(len(groups))]
    manifest = {"fingerprint": fingerprint(cfg, plan.crops), "config": to_dict(cfg)}
    existing = check_resumable(out, cfg.prefix, manifest["fingerprint"])
    if not storage.is_remote(out):  # an upload leaves no temp object
        for stale in out.glob(f"{glob.escape(cfg.prefix)}-*.tar.tmp"):
            stale.unlink()
    planned = [{"name": n, "samples": len(g)} for n, g in zip(names, groups)]
    write_json_atomic(storage.join(out, MANIFEST), {**manifest, "complete": False,
                                                    "shards": planned})  # fmt: skip
    todo = [(cfg, storage.child(out, n), g) for n, g in zip(names, groups) if n not in existing]
    results = {r["name"]: r for r in _run_tasks(todo, cfg.workers, progress)}
    for r in results.values():
        for item in r["bad"]:
            log.warning("skipped unreadable image %s: %s", item["path"], item["error"])
    counted = {n: r["samples"] for n, r in results.items()}
    shards = [
        {"name": n, "samples": counted[n] if n in counted else count_samples(storage.child(out, n))}
        for n in names
    ]
    bad = plan.bad + [item for r in results.values() for item in r["bad"]]
    manifest.update(
        complete=True,
        shards=shards,
        samples=sum(s["samples"] for s in shards),
        images=plan.images,
        bad_images=bad,
        num_bad_images=len(bad),
        too_small=len(plan.too_small),
        written=sorted(results),
    )
    write_json_atomic(storage.join(out, MANIFEST), manifest)
    return manifest


def check_resumable(out: Path | str, prefix: str, fp: str) -> set[str]:
    """Refuse to add shards to a folder holding shards of another plan; returns the names of
    the finished shards it holds."""
    existing = [n for n in storage.listdir(out)
                if re.fullmatch(re.escape(prefix) + r"-\d+\.tar", n)]  # fmt: skip
    if not existing:
        return set()
    try:
        old = (storage.read_json(storage.join(out, MANIFEST)) or {}).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old != fp:
        raise ValueError(
            f"{out} already holds {len(existing)} shard(s) (e.g. {existing[0]}) written with "
            f"another config or image set ({MANIFEST} fingerprint differs or is missing); "
            "use a new output folder or delete the old shards"
        )
    return set(existing)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core, not cores x threads


def _write_task(task) -> dict:
    return write_shard(*task)


def _run_tasks(tasks: list, workers: int, progress: bool):
    """Yield shard results as they finish, in-process or from a pool of fresh processes."""
    bar = tqdm(total=len(tasks), unit="shard", disable=not progress, desc="shards")
    with bar, contextlib.ExitStack() as stack:
        if workers == 1 or len(tasks) <= 1:
            results = map(_write_task, tasks)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a torch-threaded parent
            pool = stack.enter_context(ctx.Pool(min(workers, len(tasks)), _init_worker))
            results = pool.imap_unordered(_write_task, tasks)
        for result in results:
            bar.update(1)
            yield result
