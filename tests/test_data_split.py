"""The training stream's split and position: readers (ranks x DataLoader workers) share each
pass of the shards without overlap, and a stream rebuilt from a saved position continues
exactly, with and without workers, with corrupt data and with the joined teacher cache."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch import nn

from distsr.data.cache import TeacherCache
from distsr.data.config import DataConfig
from distsr.data.reader import StreamPlan, make_train_loader
from distsr.teachers import RegressionTeacher
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.config import CacheJobConfig

SHARDS, PER_SHARD = 6, 8


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def equal_shards(tmp_path_factory) -> Path:
    """6 shards x 8 samples (gt 16x16, lq 4x4) whose key names the shard: ``s<shard>_<i>``."""
    out = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        with wds.TarWriter(str(out / f"train-{s:06d}.tar")) as sink:
            for i in range(PER_SHARD):
                gt = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                sink.write({"__key__": f"s{s}_{i}", "gt.png": png(gt), "lq.png": png(gt[::4, ::4]),
                            "meta.json": json.dumps({"i": i}).encode()})  # fmt: skip
    return out


def data_cfg(shards, **kw) -> DataConfig:
    return DataConfig(shards=[str(shards)], **{"batch_size": 4, "shuffle": 0, "scale": 4, **kw})


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def shard_of(key: str) -> int:
    return int(key[1:].split("_")[0])


def stream(cfg, steps, rank=0, world_size=1, **kw):
    return list(make_train_loader(cfg, rank=rank, world_size=world_size, steps=steps, seed=3, **kw))


# ---------------------------------------------------------------- the split


def test_each_pass_gives_every_shard_to_exactly_one_reader():
    for readers in [(1, 1), (1, 2), (2, 2), (3, 4)]:
        world_size, slots = readers
        plans = [StreamPlan([f"u{i}" for i in range(5)], 7, r, world_size, slots, 1)
                 for r in range(world_size)]  # fmt: skip
        # reads in global order g = (read * slots + slot) * world_size + rank
        reads = [plans[r].shard(w, read) for read in range(25) for w in range(slots)
                 for r in range(world_size)]  # fmt: skip
        for p in range(len(reads) // 5):
            assert sorted(reads[5 * p : 5 * p + 5]) == [f"u{i}" for i in range(5)], (readers, p)
        assert reads[:5] != reads[5:10]  # passes are permuted afresh


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 0), (2, 3)])
def test_one_pass_yields_every_sample_once_over_ranks_and_workers(
    equal_shards, world_size, workers
):
    """One pass = 48 samples = 6 shards, one or two per reader (ranks x workers); the
    batches of the workers interleave."""
    cfg = data_cfg(equal_shards, num_workers=workers)
    per_rank = SHARDS * PER_SHARD // world_size // cfg.batch_size
    keys = [k for r in range(world_size) for k in keys_of(stream(cfg, per_rank, r, world_size))]
    assert len(keys) == SHARDS * PER_SHARD and len(set(keys)) == len(keys)


def test_rank_streams_are_neither_copies_nor_shifts_and_visit_every_shard(equal_shards):
    cfg = data_cfg(equal_shards, num_workers=2, shuffle=16)
    seqs = [keys_of(stream(cfg, 48, r, 2)) for r in range(2)]  # 8 passes of the job
    n = len(seqs[0])
    for d in range(-n // 2, n // 2):  # rank 1 is no shift of rank 0 by d samples (d = 0: copy)
        a, b = (seqs[0][d:], seqs[1]) if d >= 0 else (seqs[0], seqs[1][-d:])
        overlap = min(len(a), len(b))
        same = sum(x == y for x, y in zip(a[:overlap], b[:overlap], strict=True))
        assert same < overlap // 4, d
    for seq in seqs:
        assert set(map(shard_of, seq)) == set(range(SHARDS))
    # 8 whole passes over both ranks: every sample exactly 8 times
    assert set(Counter(seqs[0] + seqs[1]).values()) == {8}


# ---------------------------------------------------------------- exact continuation


def resumed(cfg, steps: int, cut: int, **kw) -> tuple[list, int]:
    """The stream cut after ``cut`` batches and rebuilt from its state: batches, skipped."""
    first = make_train_loader(cfg, rank=1, world_size=2, steps=cut, seed=3, **kw)
    head = list(first)
    state = first.state_dict()
    assert state["batches"] == cut
    second = make_train_loader(cfg, rank=1, world_size=2, steps=steps - cut, seed=3,
                               start_step=cut, state=state, **kw)  # fmt: skip
    return head + list(second), first.skipped + second.skipped


def assert_same_batches(want: list, got: list) -> None:
    assert len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert a["__key__"] == b["__key__"], i
        assert torch.equal(a["gt"], b["gt"]) and torch.equal(a["lq"], b["lq"]), i
        if "cache" in a:
            assert all(torch.equal(a["cache"][k], b["cache"][k]) for k in a["cache"]
                       if isinstance(a["cache"][k], torch.Tensor)), i  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 3, 6])
def test_stream_rebuilt_from_its_state_continues_exactly(tiny_shards, workers, cut):
    """Random crops, shuffle blocks of 12 samples (3 batches): cuts inside and at block ends."""
    cfg = DataConfig(shards=[str(tiny_shards)], batch_size=4, shuffle=12, gt_size=16, scale=4,
                     num_workers=workers)  # fmt: skip
    whole = stream(cfg, 10, rank=1, world_size=2)
    again, _ = resumed(cfg, 10, cut)
    assert_same_batches(whole, again)
    # without the state a resumed run reads other batches (fresh streams)
    fresh = stream(cfg, 10 - cut, rank=1, world_size=2, start_step=cut)
    assert keys_of(fresh) != keys_of(whole[cut:])


def test_resume_with_corrupt_data_counts_each_skip_once(equal_shards, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for src in sorted(equal_shards.glob("*.tar"))[:3]:
        (shards / src.name).write_bytes(src.read_bytes())
    data = (shards / "train-000001.tar").read_bytes()
    (shards / "train-000001.tar").write_bytes(data[: len(data) // 2])  # truncated mid-shard
    with wds.TarWriter(str(shards / "train-000009.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"bad{i}", "gt.png": b"not a png", "lq.png": b"x",
                        "meta.json": b"{}"})  # fmt: skip
    cfg = data_cfg(shards, num_workers=0, shuffle=6)
    whole = list(make_train_loader(cfg, rank=1, world_size=2, steps=16, seed=3))
    skipped = sum(b["skipped"] for b in whole)
    assert skipped > 0
    for cut in (1, 2, 5, 9):
        again, again_skipped = resumed(cfg, 16, cut)
        assert_same_batches(whole, again)
        assert again_skipped == skipped, cut


class TinySR(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3 * 16, 3, padding=1)
        self.up = nn.PixelShuffle(4)

    def forward(self, lq):
        return torch.sigmoid(self.up(self.conv(lq)))


@pytest.mark.parametrize("workers", [0, 2])
def test_joined_cache_stream_continues_exactly(equal_shards, tmp_path, workers):
    teacher = RegressionTeacher(TinySR(), scale=4, arch="tiny")
    job = CacheJobConfig(shards=[str(equal_shards)], output=str(tmp_path / "cache"), batch_size=4)
    cache = TeacherCache(run_in_process(job, teacher)["cache_dir"])
    cfg = data_cfg(equal_shards, num_workers=workers, shuffle=8)
    whole = stream(cfg, 14, rank=1, world_size=2, cache=cache)
    assert all(b["cache"]["z0"].shape == (4, 1, 3, 16, 16) for b in whole)  # K = 1 draw
    for cut in (3, 7):
        again, _ = resumed(cfg, 14, cut, cache=cache)
        assert_same_batches(whole, again)


def test_a_state_of_another_layout_starts_fresh_streams(equal_shards, caplog):
    cfg = data_cfg(equal_shards, num_workers=0)
    loader = make_train_loader(cfg, rank=0, world_size=1, steps=3, seed=3)
    list(loader)
    other = data_cfg(equal_shards, num_workers=2)
    again = make_train_loader(other, rank=0, world_size=1, steps=3, seed=3, start_step=3,
                              state=loader.state_dict())  # fmt: skip
    assert again.batches == 0 and "starting fresh data streams" in caplog.text
