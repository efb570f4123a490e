"""Loader benchmark: samples/s of the training reader, input shards alone and joined with a
teacher cache, against the number of DataLoader workers.

Data: shards cut from the bundled photos (``make_shards``, grid crops of ``crop_size``, the
configured degradation) and a teacher cache over them in the cache's real layout
(``TeacherCache.write_shard``): float16 ``z0`` [K, C, h, w], ``z_gt`` and ``z_y`` [C, h, w] and
the int64 seeds, where (C, h, w) is the teacher's latent of one gt crop: ``size="full"`` is
the released ResShift teacher (VQ-f4: 3 x crop/4 x crop/4, 256 crops), ``size="tiny"`` the
pixel-space tiny teacher (3 x crop x crop, 32 crops). Reading cost depends on the bytes and
the decoding, not on the values, so the cached values are a cheap stand-in (gt average-pooled
to the latent size) instead of a teacher run.

Each setting (``mode`` input | joined, ``workers``) makes a fresh ``make_train_loader`` and
reads ``batches`` batches; the time to the first batch (start-up: worker processes, first shard
opened) is reported apart from the steady rate over the rest. Settings run in turn, ``repeats``
rounds, interleaved. With no workers the reading runs in the process and uses its torch threads
(``threads``); DataLoader workers use one each. ``jobs/bench_loader.py`` is the command line.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from distsr.bench.cli import torch_threads, write_report
from distsr.bench.stats import spread
from distsr.data.cache import SEED, TeacherCache, shard_name
from distsr.data.config import DataConfig, DegradationConfig, ShardsConfig
from distsr.data.reader import list_shards, make_train_loader
from distsr.data.shards import make_shards

SIZES = {"tiny": (32, 1), "full": (256, 4)}  # crop size, latent downsampling of the teacher
MODES = ("input", "joined")


@dataclass
class BenchLoaderConfig:
    size: str = "tiny"
    crop_size: int | None = None  # None: the size's crop (32 tiny, 256 full)
    stride: int | None = None  # None: the crop size
    shard_size: int = 64
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    draws: int = 1  # K teacher trajectories per crop in the cache
    batch_size: int = 8
    shuffle: int = 64
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batches: int = 40  # read per setting, the first one timed apart
    repeats: int = 3
    threads: int = 0  # torch threads of the reading process; 0 = torch's default (one per core)
    output: str = "runs/bench_loader"

    def validate(self):
        problems = []
        if self.size not in SIZES:
            problems.append(("size", f"choose from {list(SIZES)}, got {self.size!r}"))
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            problems.append(("modes", f"choose from {list(MODES)}, got {self.modes}"))
        if not self.workers or min(self.workers) < 0:
            problems.append(("workers", f"a list of counts >= 0, got {self.workers}"))
        if self.threads < 0:
            problems.append(("threads", "must be >= 0"))
        for key in ("shard_size", "draws", "batch_size", "repeats"):
            if getattr(self, key) < 1:
                problems.append((key, "must be >= 1"))
        if self.batches < 2:
            problems.append(("batches", "must be >= 2 (the first batch is timed apart)"))
        return problems

    @property
    def crop(self) -> int:
        return self.crop_size or SIZES[self.size][0]


def prepare_shards(cfg: BenchLoaderConfig, out: Path) -> Path:
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        shards_cfg = ShardsConfig(inputs=["bundled"], output=str(shards), crop_size=cfg.crop,
                                  stride=cfg.stride or cfg.crop, shard_size=cfg.shard_size,
                                  degradation=cfg.degradation)  # fmt: skip
        make_shards(shards_cfg, progress=False)
    return shards


def stand_in_fields(down: int, draws: int):
    """A cache ``fields_fn`` with the teacher's latent shapes: gt in [-1, 1], average-pooled by
    the first stage's factor (values do not matter for reading cost)."""

    def fields_fn(batch: dict) -> dict:
        z = F.avg_pool2d(batch["gt"] * 2 - 1, down) if down > 1 else batch["gt"] * 2 - 1
        seeds = torch.arange(draws).repeat(len(z), 1)
        return {"z0": z[:, None].repeat(1, draws, 1, 1, 1), "z_gt": z, "z_y": z, SEED: seeds}

    return fields_fn


def prepare_cache(cfg: BenchLoaderConfig, shards: Path, out: Path) -> TeacherCache:
    parts = {"bench_loader": cfg.size, "crop": cfg.crop}
    cache = TeacherCache.create(out / "cache", parts, noise_seed=0, draws=cfg.draws,
                                outputs=["z0"], stored=["z_y"])  # fmt: skip
    fields_fn = stand_in_fields(SIZES[cfg.size][1], cfg.draws)
    done = cache.finished()
    for url in list_shards([str(shards)]):
        name = shard_name(url)
        if name not in done:
            cache.record(name, cache.write_shard(url, fields_fn, batch_size=16, scale=4))
    return cache


def read_rate(data: DataConfig, batches: int, cache: TeacherCache | None) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the other ``batches - 1``)."""
    start = time.perf_counter()
    loader = make_train_loader(data, rank=0, world_size=1, steps=batches, seed=0, cache=cache)
    first, samples = None, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        else:
            samples += len(batch["__key__"])
    return first - start, samples / (time.perf_counter() - first)


def bench_loader(cfg: BenchLoaderConfig) -> dict:
    with torch_threads(cfg.threads):  # DataLoader workers always run with one
        return run_settings(cfg)


def run_settings(cfg: BenchLoaderConfig) -> dict:
    out = Path(cfg.output)
    shards = prepare_shards(cfg, out)
    cache = prepare_cache(cfg, shards, out) if "joined" in cfg.modes else None
    settings = [(mode, w) for mode in cfg.modes for w in cfg.workers]
    startup = {s: [] for s in settings}
    rates = {s: [] for s in settings}
    for _ in range(cfg.repeats):
        for mode, workers in settings:
            data = DataConfig(shards=[str(shards)], batch_size=cfg.batch_size,
                              num_workers=workers, shuffle=cfg.shuffle, scale=4)  # fmt: skip
            first, rate = read_rate(data, cfg.batches, cache if mode == "joined" else None)
            startup[(mode, workers)].append(first)
            rates[(mode, workers)].append(rate)
    return report(cfg, shards, cache, startup, rates)


def report(cfg, shards: Path, cache, startup: dict, rates: dict) -> dict:
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = [
        {"mode": mode, "workers": w, "samples_per_s": spread(rates[(mode, w)]),
         "first_batch_s": spread(startup[(mode, w)]), "rates": rates[(mode, w)]}
        for mode, w in rates
    ]  # fmt: skip
    shapes = {}
    if cache is not None:
        entry = next(iter(cache.manifest()["shards"].values()))
        shapes = entry["shapes"]
    result = {
        "config": asdict(cfg),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "samples": manifest["samples"],
        "shards": len(manifest["shards"]),
        "input_bytes_per_sample": _bytes_per_sample(shards),
        "cache_bytes_per_sample": _bytes_per_sample(cache.path) if cache is not None else None,
        "cache_shapes": shapes,
        "rows": rows,
    }
    result["table"] = table(result)
    write_report(Path(cfg.output), "bench_loader", result, result["table"])
    return result


def _bytes_per_sample(folder: Path) -> float:
    manifest = json.loads((folder / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return size / max(manifest["samples"], 1)


def table(result: dict) -> str:
    batch = result["config"]["batch_size"]
    lines = [f"| reader | workers | samples/s: median (min-max) | batches/s at batch {batch} "
             "| first batch s |", "|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        r, f = row["samples_per_s"], row["first_batch_s"]
        rate = f"{r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f})"
        lines.append(
            f"| {row['mode']} | {row['workers']} | {rate} | {r['median'] / batch:.1f} "
            f"| {f['median']:.2f} |"
        )
    return "\n".join(lines) + "\n"
