"""Elastic runs at the unit level: the global-batch rule (``engine/elastic.py``) and the data
position carried across a change of world size (``data/regroup.py``), on real shards read by the
real reader. The two-node run that loses and regains a worker is ``test_ray_elastic.py``."""

from __future__ import annotations

import math

import pytest
import webdataset as wds

from distsr.config import from_dict
from distsr.data.config import DataConfig
from distsr.data.reader import make_train_loader
from distsr.data.regroup import regrouped
from distsr.engine.config import EngineConfig, ScalingConfig
from distsr.engine.elastic import batch_plan

SHARDS, PER_SHARD = 24, 5  # 120 samples: the reads below stay inside the first pass


@pytest.mark.parametrize(("workers", "accum"), [([1, 2], 1), ([2, 3], 1), ([1, 4], 2), (2, 3)])
def test_the_global_batch_is_held_or_the_lr_scaled_by_its_ratio(workers, accum):
    scaling = from_dict(ScalingConfig, {"num_workers": workers})
    engine = from_dict(EngineConfig, {"grad_accum": accum})
    lo, hi = scaling.min_workers, scaling.max_workers
    target = 4 * accum * hi
    for w in range(lo, hi + 1):
        plan = batch_plan(engine, 4, scaling, w)
        # every rank's micro-batches per step times the world: the samples of one step
        assert plan.global_batch == 4 * plan.grad_accum * w
        assert plan.global_batch >= target and plan.global_batch - target < 4 * w
        exact = (accum * hi) % w == 0
        assert (plan.global_batch == target) == exact
        assert math.isclose(plan.lr_scale, plan.global_batch / target, rel_tol=0, abs_tol=0)
    if scaling.elastic:
        with pytest.raises(ValueError, match="outside"):
            batch_plan(engine, 4, scaling, hi + 1)


def test_num_workers_takes_an_int_or_min_max():
    assert from_dict(ScalingConfig, {"num_workers": [1, 3]}).elastic
    assert not from_dict(ScalingConfig, {"num_workers": 2}).elastic
    assert from_dict(ScalingConfig, {"num_workers": [1, 2]}).validate() == []
    for bad in ([3, 1], [0, 2], [1, 2, 3]):
        problems = ScalingConfig(num_workers=bad).validate()
        assert problems and problems[0][0] == "num_workers", bad


@pytest.fixture(scope="module")
def keyed_shards(tiny_shards, tmp_path_factory):
    """``SHARDS`` shards of ``PER_SHARD`` real samples, keys unique over all of them."""
    folder = tmp_path_factory.mktemp("elastic_shards")
    samples = wds.tarfile_samples([{"url": str(p)} for p in sorted(tiny_shards.glob("*.tar"))])
    for i in range(SHARDS):
        with wds.TarWriter(str(folder / f"part-{i:02d}.tar")) as sink:
            for j in range(PER_SHARD):
                s = next(samples)
                sink.write({"__key__": f"s{i:02d}_{j}", **{k: v for k, v in s.items() if "." in k}})
    return folder


def consume(cfg, world: int, steps: int, states=None) -> tuple[set[str], list[dict]]:
    """``steps`` batches on each of ``world`` ranks (continuing ``states``, one per rank, as
    ``Trainer.restore`` hands them over); the keys read and each rank's state after."""
    keys, after = set(), []
    for rank in range(world):
        state = regrouped(states, rank, world) if states else None
        loader = make_train_loader(cfg, rank=rank, world_size=world, steps=steps, seed=3,
                                   start_step=1 if states else 0, state=state)  # fmt: skip
        for batch in loader:
            keys.update(batch["__key__"])
        after.append(loader.state_dict())
    return keys, after


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_a_new_world_size_never_reads_a_consumed_sample_again(keyed_shards, old, new,
                                                              num_workers):  # fmt: skip
    cfg = DataConfig(shards=[str(keyed_shards)], batch_size=3, shuffle=4, scale=4,
                     num_workers=num_workers)  # fmt: skip
    before, states = consume(cfg, old, 3)
    after, _ = consume(cfg, new, 3, states)
    assert len(before) == old * 3 * 3 and len(after) == new * 3 * 3
    assert not before & after, sorted(before & after)
    # what is skipped: the rest of the reads in progress, never more than a read per reader
    # of the old world (one slot each without workers, two with)
    shards_before = {k.split("_")[0] for k in before}
    lost = {f"s{i:02d}_{j}" for i in range(SHARDS) for j in range(PER_SHARD)
            if f"s{i:02d}" in shards_before} - before  # fmt: skip
    assert len(lost) <= old * max(num_workers, 1) * PER_SHARD


def test_the_same_world_size_continues_its_own_stream(keyed_shards):
    cfg = DataConfig(shards=[str(keyed_shards)], batch_size=3, shuffle=4, scale=4)
    _, states = consume(cfg, 2, 2)
    assert regrouped(states, 1, 2) is states[1]
    assert regrouped([], 0, 2) is None and regrouped([None, None], 0, 1) is None
