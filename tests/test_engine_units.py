"""Engine pieces that need no process group: LR schedule, DeepSpeed JSON, the local store."""

from __future__ import annotations

import pytest

from distsr.config import from_dict
from distsr.engine.checkpoint import CLIENT_STATE, LocalStore
from distsr.engine.config import EngineConfig, SchedulerConfig
from distsr.engine.deepspeed_config import deepspeed_config
from distsr.engine.schedule import lr_factor


def test_warmup_then_cosine_reaches_min_ratio():
    cfg = SchedulerConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(cfg, s, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 4, 20) == pytest.approx(1.0)
    assert lr_factor(cfg, 12, 20) == pytest.approx(0.55)
    assert lr_factor(cfg, 20, 20) == pytest.approx(0.1)


def test_step_decay_and_linear():
    step = SchedulerConfig(kind="step", step_every=10, gamma=0.1)
    assert lr_factor(step, 9, 100) == 1.0
    assert lr_factor(step, 25, 100) == pytest.approx(0.01)
    lin = SchedulerConfig(kind="linear")
    assert lr_factor(lin, 5, 10) == pytest.approx(0.5)


def test_deepspeed_json_follows_typed_config():
    cfg = from_dict(EngineConfig, {"zero_stage": 3, "precision": "bf16", "grad_accum": 2})
    ds = deepspeed_config(cfg, micro_batch=4, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == cfg.grad_clip


def _write(marker: str):
    def write(folder):
        folder.mkdir(parents=True)
        (folder / CLIENT_STATE).write_text(marker)

    return write


def test_local_store_keeps_newest_and_ignores_half_written(tmp_path):
    store = LocalStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(step, _write(str(step)), {})
    names = [p.name for p in store.complete()]
    assert names == ["step_00000020", "step_00000030"]
    # a crash mid-write leaves a folder without the client state: never picked
    (store.root / "step_00000040").mkdir()
    (store.root / ".tmp-step_00000050-1").mkdir()
    with store.latest() as folder:
        assert folder.name == "step_00000030"
        assert (folder / CLIENT_STATE).read_text() == "30"
