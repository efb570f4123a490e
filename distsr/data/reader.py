"""Reading training shards: an endless, resumable stream of decoded, cropped, batched
``gt``/``lq``.

Steps, not epochs (see docs: ZeRO-3 forwards are collective): the stream never ends and every
rank yields exactly ``steps`` batches. Each rank has ``slots`` readers (one per DataLoader
worker, or one without workers). Reader ``slot`` of ``rank`` makes its ``read``-th shard read
at global index g = (read * slots + slot) * world_size + rank: pass ``g // N`` is a seeded
permutation of the N shards shared by all ranks, and g picks its entry ``g % N``. So within a
pass no two readers (of any rank or worker) read the same shard, every shard is read once per
pass, and the stream is a pure function of (seed, position): nothing is drawn with replacement.

Shuffling is by blocks: a reader's samples are cut into consecutive blocks of ``shuffle``
samples, each permuted by a seed of (seed, rank, slot, block); each sample's crop and its
flips/rotations (``data.augment``) have their own seeds too. A reader's position is therefore
four integers, ``{read, offset, block, taken}``: block ``block`` starts at sample ``offset`` of
shard read ``read`` and ``taken`` of its samples have been yielded.
``TrainLoader.state_dict()`` holds every reader's position after the last batch handed out;
``make_train_loader(..., state=...)`` continues exactly there (it re-reads at most one shard
prefix and one block, decoding nothing it skips). A state saved under another layout (world
size, workers, shard count or shuffle size) cannot continue: the reader then warns and starts
fresh streams seeded by ``start_step``, as does a resume without a state.

Corrupt data (an unreadable or truncated shard, an undecodable PNG, a missing field) is
skipped with one warning per shard/sample naming the shard url and key. Each skip is counted in
the ``"skipped"`` field of the next batch the same process yields, so summing that field over
the batches gives the total with or without worker processes; ``TrainLoader.skipped`` holds
the running sum. Skips met again while a resumed reader re-reads what it had already passed
are not counted twice. A stream that gives no usable sample for a long while raises instead of
spinning forever.

One pipeline, built as a list of stages (open_clip's ``get_wds_dataset`` style): shard reads
-> [join the teacher cache] -> block shuffle -> decode -> batch. With a
``data.cache.TeacherCache`` the join stage is added: input shard i and its cache shard are read
in lockstep and joined by ``__key__`` before the shuffle, and each batch carries
``batch["cache"] = {field: [B, ...], "seed": int64 [B, K], "fingerprint": str}``. An input
sample missing from the cache is skipped and counted if it is corrupt (the cache job skipped it
too) or if its cache shard ends before it (truncated, or unreadable from there on: each input
sample left without its entry is counted, so ``skipped`` is the number of samples lost);
otherwise the pairing is wrong and a ``ValueError`` names both shard urls and both keys.
``data.augment`` flips/rotates lq, gt and the cached targets alike after the join (decode stage);
a latent-space cache refuses it (module ``distsr.data.augment`` says why).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import io
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from distsr.config import ConfigError
from distsr.data import storage
from distsr.data.augment import augment_sample, draw
from distsr.data.config import AugmentConfig, DataConfig
from distsr.data.imageio import to_tensor
from distsr.seeding import stable_seed

log = logging.getLogger(__name__)
FIELDS = ("gt.png", "lq.png", "meta.json")
storage.register_webdataset()  # s3:// shard urls


def list_shards(patterns: str | Sequence[str]) -> list[str]:
    """Shard urls from folders (their ``*.tar``), globs, brace patterns, files, the same on
    object storage (``s3://bucket/prefix``, ``data.storage``) or other remote urls
    (``pipe:``, ``http://``...: kept as given). Raises ``ValueError`` naming a pattern that
    matches nothing or a listed file that does not exist."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("no shard patterns given (data.shards is empty)")
    urls: dict[str, None] = {}
    for pattern in patterns:
        found = _expand(pattern)
        if not found:
            raise ValueError(f"shard pattern {pattern!r} matches no .tar file")
        urls.update(dict.fromkeys(found))
    return list(urls)


def _expand(pattern: str) -> list[str]:
    if storage.is_remote(pattern):
        return _expand_remote(pattern)
    if "://" in pattern or pattern.startswith("pipe:"):
        return list(wds.shardlists.expand_urls(pattern))
    found = []
    for item in wds.shardlists.expand_urls(pattern):
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(str(p) for p in path.glob("*.tar"))
        elif any(c in item for c in "*?["):
            found += sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
        elif path.exists():  # a file, or a named pipe that streams one
            found.append(str(path))
        elif item != pattern:
            raise ValueError(f"shard {item} (from pattern {pattern!r}) does not exist")
    return found


def _expand_remote(pattern: str) -> list[str]:
    """``_expand`` on object storage: a folder's ``*.tar``, a glob in the last part, files."""
    found = []
    for item in wds.shardlists.expand_urls(pattern):
        if any(c in storage.name(item) for c in "*?["):
            folder = storage.parent(item)
            found += [storage.join(folder, n) for n in storage.listdir(folder)
                      if fnmatch.fnmatchcase(n, storage.name(item))]  # fmt: skip
        elif storage.is_dir(item):
            found += [storage.join(item, n) for n in storage.listdir(item) if n.endswith(".tar")]
        elif storage.is_file(item):
            found.append(item)
        elif item != pattern:
            raise ValueError(f"shard {item} (from pattern {pattern!r}) does not exist")
    return found


class SkipCounter:
    """Counts skipped corrupt samples/shard reads of one process; warns once per (url, key).

    ``max_dry``: raise after this many shard reads + skips in a row without a usable sample.
    """

    def __init__(self, max_dry: int | None = None):
        self.total = 0
        self.max_dry = max_dry
        self._pending = 0
        self._dry = 0
        self._warned: set[tuple] = set()

    def skip(self, url: str | None, key: str | None, reason: str) -> None:
        self.total += 1
        self._pending += 1
        if (url, key) not in self._warned:
            self._warned.add((url, key))
            what = f"sample {key} of shard {url}" if key else f"the rest of shard {url}"
            log.warning("skipping %s: %s", what, reason)
        self._dry_step(url)

    def shard_opened(self, url: str) -> None:
        self._dry_step(url)

    def good(self) -> None:
        self._dry = 0

    def take(self) -> int:
        """Skips since the last call (reported with the next batch)."""
        count, self._pending = self._pending, 0
        return count

    def discard(self) -> None:
        """Forget the skips since the last ``take``: a resumed reader met them again while
        re-reading data whose skips were counted before the checkpoint."""
        self.total -= self._pending
        self._pending = 0

    def _dry_step(self, url) -> None:
        self._dry += 1
        if self.max_dry is not None and self._dry > self.max_dry:
            raise RuntimeError(
                f"no usable sample in the last {self.max_dry} shard reads/skips "
                f"(last shard: {url}); are the shards empty or corrupt?"
            )


# ---------------------------------------------------------------- pipeline stages


def _worker_index() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _read_shards(src, counter: SkipCounter):
    """``{url}`` -> raw samples; a shard that fails to open/read is skipped from there on.
    Each sample is tagged with ``__pass__``, the number of the shard read it came from (a
    resampled stream may read the same shard twice in a row)."""
    for n, item in enumerate(src):
        counter.shard_opened(item["url"])
        for sample in _read_one(item["url"], counter):
            sample["__pass__"] = n
            yield sample


def _read_one(url: str, counter: SkipCounter, failed: list | None = None):
    """Raw samples of one shard; a read error is counted once and recorded in ``failed``."""
    failed = [] if failed is None else failed

    def handler(exn: Exception) -> bool:
        if not failed:  # one read error (tarfile may raise twice) -> one skip
            counter.skip(url, None, f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
        failed.append(exn)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=handler)


def _join_cache(src, cache, counter: SkipCounter):
    """Raw input samples -> the same with ``__cache__``: the members of the sample of the same
    key in the cache shard of its input shard, read in lockstep (see the module doc)."""
    current, cached, reader, failed, cache_url = None, None, iter(()), [], ""
    for sample in src:
        url, key, n = sample["__url__"], sample["__key__"], sample["__pass__"]
        if n != current:
            current, failed, cache_url = n, [], str(cache.shard_path(url))
            # a cache read error loses no sample by itself (warned, not counted): the input
            # samples it leaves without their entry are counted below, one by one
            reader = _read_one(cache_url, SkipCounter(), failed)
            cached = next(reader, None)
        if cached is not None and cached["__key__"] == key:
            sample["__cache__"] = {k: v for k, v in cached.items() if not k.startswith("__")}
            cached = next(reader, None)
            yield sample
            continue
        reason = _is_corrupt(sample)
        if reason is None and cached is None:  # the input shard was checked: a cut cache shard
            why = type(failed[0]).__name__ if failed else "truncated"
            reason = f"its cache shard {cache_url} ends before it ({why})"
        if reason is None:
            raise ValueError(
                f"teacher cache out of step with the input: input shard {url} has sample {key} "
                f"where cache shard {cache_url} has {cached['__key__']}; re-run "
                "jobs/cache_teacher.py on these shards"
            )
        counter.skip(url, key, reason)


def _is_corrupt(sample: dict) -> str | None:
    try:
        decode_fields(sample)
    except Exception as err:  # any decoder error: the cache job skipped this sample too
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class StreamPlan:
    """Where this rank's readers start: ``positions[slot]`` (see the module doc). DataLoader
    worker w plays reader ``(first + w) % slots``, so the rank's batches keep their order when
    a resumed loader starts at another worker (workers take turns, batch by batch)."""

    urls: list[str]
    seed: int
    rank: int
    world_size: int
    slots: int
    block: int
    first: int = 0
    positions: list[dict] = field(default_factory=list)
    base: int = 0  # first global read of these streams (> 0 after a change of world size)

    def __post_init__(self):
        if not self.positions:
            self.positions = [dict(START) for _ in range(self.slots)]

    def layout(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "slots": self.slots,
                "shards": len(self.urls), "shuffle": self.block}  # fmt: skip

    def slot(self) -> tuple[int, dict]:
        """This worker's reader and its start position."""
        slot = (self.first + _worker_index()) % self.slots
        return slot, self.positions[slot]

    def shard(self, slot: int, read: int) -> str:
        """The shard of reader ``slot``'s ``read``-th read (module doc)."""
        g = global_read(self.base, read, slot, self.slots, self.world_size, self.rank)
        n = len(self.urls)
        return self.urls[_pass_order(self.seed, g // n, n)[g % n]]

    def seed_of(self, slot: int, *parts) -> int:
        return stable_seed(self.seed, self.rank, slot, *parts)


START = {"read": 0, "offset": 0, "block": 0, "taken": 0}


def global_read(base: int, read: int, slot: int, slots: int, world_size: int, rank: int) -> int:
    """The global index g of reader ``slot`` of ``rank``'s ``read``-th shard read (module doc)."""
    return base + (read * slots + slot) * world_size + rank


@functools.lru_cache(maxsize=8)
def _pass_order(seed: int, index: int, n: int) -> tuple[int, ...]:
    """Pass ``index`` of the shards: a permutation of range(n), the same on every rank."""
    order = list(range(n))
    random.Random(stable_seed(seed, "pass", index)).shuffle(order)
    return tuple(order)


def _reads(plan: StreamPlan, counter: SkipCounter, cache=None):
    """Source stage: this worker's reader as ``(read, offset, raw sample)`` from its start
    position, shard read after shard read (joined with the cache when there is one)."""
    slot, start = plan.slot()
    read, skip = start["read"], start["offset"]
    while True:
        url = plan.shard(slot, read)
        counter.shard_opened(url)
        samples = _tag_read(_read_one(url, counter), read)
        if cache is not None:
            samples = _join_cache(samples, cache, counter)
        for offset, sample in enumerate(samples):
            if offset < skip:  # passed before the checkpoint: not decoded, skips not recounted
                if offset == skip - 1:
                    counter.discard()
                continue
            yield read, offset, sample
        read, skip = read + 1, 0


def _tag_read(samples, read: int):
    for sample in samples:
        sample["__pass__"] = read
        yield sample


def _shuffle_blocks(src, plan: StreamPlan, counter: SkipCounter):
    """``(read, offset, sample)`` -> samples, each block of ``plan.block`` permuted by its own
    seed; every sample carries the reader's position after it and its crop seed."""
    slot, start = plan.slot()
    size, block, taken = plan.block, start["block"], start["taken"]
    while True:
        group = list(itertools.islice(src, size))
        if taken:  # resumed inside this block: its skips were counted before the checkpoint
            counter.discard()
        order = list(range(len(group)))
        if size > 1:
            random.Random(plan.seed_of(slot, "shuffle", block)).shuffle(order)
        (read0, offset0, _), (read1, offset1, _) = group[0], group[-1]
        for k in range(taken, len(group)):
            sample = group[order[k]][2]
            if k + 1 < len(group):
                # upto: the block's last read (data.regroup)
                after = {"read": read0, "offset": offset0, "block": block, "taken": k + 1,
                         "upto": read1}  # fmt: skip
            else:
                after = {"read": read1, "offset": offset1 + 1, "block": block + 1, "taken": 0}
            sample["__position__"] = (slot, after)
            sample["__crop_seed__"] = plan.seed_of(slot, "crop", block, order[k])
            sample["__augment_seed__"] = plan.seed_of(slot, "augment", block, order[k])
            yield sample
        block, taken = block + 1, 0


def _decode(src, counter: SkipCounter, scale: int | None, gt_size: int | None, cache=None,
            augment: AugmentConfig | None = None):  # fmt: skip
    """Raw samples -> ``{__key__, __url__, gt, lq, meta}`` (float32 CHW in [0, 1]), plus
    ``cache`` (the decoded cache fields) when reading with a teacher cache. A random crop draws
    from the sample's own ``__crop_seed__``, the flips/rotations of ``augment`` (lq, gt and
    cache alike, ``data.augment``) from its ``__augment_seed__``."""
    for sample in src:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            gt, lq, meta = decode_fields(sample)
            cached = cache.decode(sample["__cache__"]) if cache is not None else None
        except Exception as err:  # any decoder error: this sample is corrupt
            counter.skip(url, key, f"{type(err).__name__}: {err}")
            continue
        if scale is not None:
            check_scale(gt, lq, scale, f"shard {url} sample {key}")
        if gt_size is not None:
            gt, lq = paired_crop(gt, lq, gt_size, scale, random.Random(sample["__crop_seed__"]))
        counter.good()
        out = {"__key__": key, "__url__": url, "gt": to_tensor(gt), "lq": to_tensor(lq),
               "meta": meta}  # fmt: skip
        if cached is not None:
            out["cache"] = cached
        if augment is not None and augment.enabled:
            augment_sample(out, draw(augment, sample["__augment_seed__"]))
        if "__position__" in sample:
            out["__position__"] = sample["__position__"]
        yield out


def decode_fields(sample: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    missing = [f for f in FIELDS if f not in sample]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return (
        decode_png(sample["gt.png"]),
        decode_png(sample["lq.png"]),
        json.loads(sample["meta.json"]),
    )


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def check_scale(gt: np.ndarray, lq: np.ndarray, scale: int, where: str) -> None:
    if gt.shape[:2] != (lq.shape[0] * scale, lq.shape[1] * scale):
        raise ValueError(
            f"{where}: gt {gt.shape[1]}x{gt.shape[0]} is not {scale}x lq "
            f"{lq.shape[1]}x{lq.shape[0]}; data.scale must match the shards' degradation.scale"
        )


def paired_crop(gt, lq, gt_size: int, scale: int, rng: random.Random):
    """Random ``gt_size`` gt crop and the lq crop it came from (aligned to the lq grid)."""
    size = gt_size // scale
    h, w = lq.shape[:2]
    if h < size or w < size:
        raise ValueError(
            f"data.gt_size={gt_size} is larger than the stored gt {w * scale}x{h * scale}"
        )
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    lq = lq[top : top + size, left : left + size]
    gt = gt[top * scale : (top + size) * scale, left * scale : (left + size) * scale]
    return gt, lq


def _batch(src, counter: SkipCounter, batch_size: int, cache=None):
    for group in iter(lambda: list(itertools.islice(src, batch_size)), []):
        if len(group) == batch_size:
            batch = collate(group, skipped=counter.take())
            if cache is not None:
                batch["cache"]["fingerprint"] = cache.fingerprint
            batch["__position__"] = group[-1]["__position__"]  # the reader's, after this batch
            yield batch


def collate(samples: list[dict], skipped: int = 0) -> dict:
    """Stack samples into a batch; their ``cache`` fields (if any) into ``batch["cache"]``."""
    shapes = {(s["gt"].shape, s["lq"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"samples of different sizes {sorted(shapes)}: set data.gt_size to crop")
    batch = {
        "gt": torch.stack([s["gt"] for s in samples]),
        "lq": torch.stack([s["lq"] for s in samples]),
        "__key__": [s["__key__"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": skipped,
    }
    if "cache" in samples[0]:
        batch["cache"] = {
            k: torch.stack([s["cache"][k] for s in samples]) for k in samples[0]["cache"]
        }
    return batch


# ---------------------------------------------------------------- loaders


class TrainLoader:
    """Iterable of exactly ``steps`` batches; ``skipped`` sums the batches' skip counts;
    ``state_dict()`` is where every reader stands after the last batch handed out."""

    def __init__(self, dataset: wds.DataPipeline, steps: int, num_workers: int,
                 plan: StreamPlan, batches: int = 0):  # fmt: skip
        self.dataset, self.steps, self.num_workers = dataset, steps, num_workers
        self.plan = plan
        self.skipped = 0
        self.batches = batches  # handed out by this stream, before a resume included
        self.positions = [dict(p) for p in plan.positions]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        source = self.dataset
        if self.num_workers > 0:  # its own generator: the process RNG stays untouched
            source = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        count = 0
        for batch in itertools.islice(source, self.steps):
            self.skipped += batch["skipped"]
            slot, after = batch.pop("__position__")
            self.positions[slot] = after
            self.batches += 1
            count += 1
            yield batch
        if count != self.steps:  # cannot happen with endless streams
            raise RuntimeError(f"data stream ended after {count} of {self.steps} batches")

    def state_dict(self) -> dict:
        """Plain ints and strings (saved in the checkpoint's client state)."""
        return {"seed": self.plan.seed, "layout": self.plan.layout(), "batches": self.batches,
                "positions": [dict(p) for p in self.positions], "base": self.plan.base}  # fmt: skip


def make_train_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    steps: int,
    seed: int,
    start_step: int = 0,
    state: dict | None = None,
    cache=None,
) -> TrainLoader:
    """Exactly ``steps`` batches ``{gt [B,3,H,W], lq [B,3,h,w] float32 in [0,1], __key__,
    meta, skipped}`` for this rank. ``state`` (a ``TrainLoader.state_dict()``) continues that
    stream exactly; without it a resumed run (``start_step`` > 0) gets fresh streams seeded by
    ``start_step``. With ``cache`` (a ``data.cache.TeacherCache``, checked to cover every shard
    first) each batch also carries ``batch["cache"]`` (see the module doc)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    problems = cfg.validate()
    if problems:
        raise ConfigError([(f"data.{key}", msg) for key, msg in problems], "data config")
    urls = list_shards(cfg.shards)
    gt_size = cfg.gt_size
    if cache is not None:
        if cfg.augment.enabled and not cache.image_space:
            raise ConfigError([("data.augment", f"teacher cache {cache.path} holds latent-space "
                                "targets, which flips/rotations of the image do not map onto: "
                                "set data.augment.hflip/rot90=false")], "data config")  # fmt: skip
        cache.check_inputs(urls, gt_size)  # the same inputs; no random crop of cached targets
        gt_size = None
    slots = max(cfg.num_workers, 1)
    plan = StreamPlan(urls, seed, rank, world_size, slots, block=max(cfg.shuffle, 1))
    batches = 0
    if state is not None and state.get("layout") == plan.layout():
        batches = state["batches"]
        plan.seed, plan.first = state["seed"], batches % slots
        plan.positions = [dict(p) for p in state["positions"]]
        plan.base = state.get("base", 0)
    elif state is not None and "regrouped_from" in state:  # another world size (data.regroup)
        plan.seed, plan.base = state["seed"], state["base"]
    elif state is not None or start_step:
        if state is not None:
            log.warning("the saved data position was made for %s, this run reads %s: starting "
                        "fresh data streams", state["layout"], plan.layout())  # fmt: skip
        plan.seed = stable_seed(seed, "restart", start_step)
    counter = SkipCounter(max_dry=1000 + cfg.shuffle)
    stages = [functools.partial(_reads, plan=plan, counter=counter, cache=cache),
              functools.partial(_shuffle_blocks, plan=plan, counter=counter)]  # fmt: skip
    stages += [
        functools.partial(
            _decode,
            counter=counter,
            scale=cfg.scale,
            gt_size=gt_size,
            cache=cache,
            augment=cfg.augment,
        ),
        functools.partial(_batch, counter=counter, batch_size=cfg.batch_size, cache=cache),
    ]
    dataset = wds.DataPipeline(*stages).with_epoch(nbatches=math.ceil(steps / slots))
    return TrainLoader(dataset, steps, cfg.num_workers, plan, batches)


def iter_samples(
    urls: str | Sequence[str], *, scale: int | None = None, counter: SkipCounter | None = None
) -> Iterator[dict]:
    """Every sample of the shards once, in order (for evaluation): ``{__key__, __url__,
    gt [3,H,W], lq [3,h,w] float32 in [0,1], meta}``; corrupt data skipped and counted in
    ``counter``. ``scale``, if given, checks gt = scale x lq."""
    counter = counter if counter is not None else SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list_shards(urls)),
        functools.partial(_read_shards, counter=counter),
        functools.partial(_decode, counter=counter, scale=scale, gt_size=None),
    )
    return iter(pipeline)
