"""Engine pieces: LR schedule, DeepSpeed JSON, per-engine overrides, the local store; and the
two TAD-SR engine options (no clipping, a constant lr on one engine) through real DeepSpeed
engines over gloo in this process."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distsr.config import ConfigError, from_dict
from distsr.engine.build import build_engine, engine_config
from distsr.engine.checkpoint import CLIENT_STATE, LocalStore
from distsr.engine.config import EngineConfig, SchedulerConfig
from distsr.engine.context import init_in_process
from distsr.engine.deepspeed_config import deepspeed_config
from distsr.engine.schedule import build_scheduler, lr_factor


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


@pytest.mark.parametrize("clip", [0, 0.0, None])
def test_no_grad_clip_is_written_as_zero(clip):
    """DeepSpeed clips at norm 1.0 when ``gradient_clipping`` is absent (and fails on null), so
    "no clipping" must reach the JSON as 0.0."""
    cfg = from_dict(EngineConfig, {"grad_clip": clip})
    ds = deepspeed_config(cfg, micro_batch=1, world_size=1)
    assert ds["gradient_clipping"] == 0.0 and isinstance(ds["gradient_clipping"], float)
    assert deepspeed_config(from_dict(EngineConfig, {"grad_clip": 2}), 1, 1)[
        "gradient_clipping"
    ] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="grad_clip"):
        from_dict(EngineConfig, {"grad_clip": -1.0})


def test_per_engine_override_gives_a_constant_lr():
    """TAD-SR's official discriminator: its lr is the base lr from step 0 while the student
    warms up over 4 steps; the shared config is left as it was."""
    cfg = from_dict(
        EngineConfig,
        {"max_steps": 10, "optimizer": {"lr": 1e-3}, "scheduler": {"warmup_steps": 4}},
    )
    disc = engine_config(cfg, {"lr": 2e-3, "scheduler": {"kind": "constant", "warmup_steps": 0}})
    assert engine_config(cfg, None) is cfg and engine_config(cfg, {}) is cfg
    assert cfg.scheduler.warmup_steps == 4 and cfg.optimizer.lr == 1e-3
    assert disc.optimizer.lr == 2e-3 and disc.optimizer.betas == cfg.optimizer.betas
    assert disc.max_steps == 10 and disc.grad_clip == cfg.grad_clip

    def lrs(c: EngineConfig) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=c.optimizer.lr)
        sched, out = build_scheduler(opt, c.scheduler, c.max_steps), []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    # exact: k/4 * 1e-3 and 1 * 2e-3 are the products the schedule computes
    assert lrs(cfg) == [1e-3 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert lrs(disc) == [2e-3] * 6
    with pytest.raises(ValueError, match=r"scheduler\.warmup: unknown .*warmup_steps"):
        engine_config(cfg, {"scheduler": {"warmup": 0}})
    with pytest.raises(ValueError, match="momentum: unknown"):
        engine_config(cfg, {"momentum": 0.9})
    with pytest.raises(ValueError, match="lr: must be > 0"):
        engine_config(cfg, {"lr": 0.0})


class _Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return (self.w * scale).sum()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_real_engines_clip_only_when_asked_and_keep_a_constant_disc_lr(grad_clip):
    """Two DeepSpeed engines as TAD-SR builds them: the gradient [30, 40] (norm 50) reaches
    AdamW unclipped with grad_clip 0 and scaled to norm 1 with grad_clip 1; the "disc" engine
    keeps its lr while the "student" warms up. First AdamW step from w = 0 (bias-corrected
    m = g, v = g^2): w = -lr * g / (|g| + eps); eps = 10 makes the update depend on |g|."""
    ctx = init_in_process()
    cfg = from_dict(
        EngineConfig,
        {
            "max_steps": 10,
            "grad_clip": grad_clip,
            "optimizer": {"lr": 0.5, "eps": 10.0},
            "scheduler": {"warmup_steps": 4},
        },
    )
    constant = {"scheduler": {"kind": "constant", "warmup_steps": 0}}
    engines = {
        "student": build_engine(_Scalar(), cfg, 1, ctx),
        "disc": build_engine(_Scalar(), cfg, 1, ctx, constant),
    }
    g = torch.tensor([30.0, 40.0])
    seen = g if grad_clip == 0 else g / 50.0
    for name, engine in engines.items():
        assert engine.gradient_clipping() == grad_clip
        lr = engine.get_lr()[0]
        assert lr == (0.125 if name == "student" else 0.5)
        engine.backward(engine(g))
        engine.step()
        expected = -lr * seen / (seen.abs() + 10.0)
        # AdamW's bias corrections and sqrt are not exactly rounded: within 8 float32 ulps
        torch.testing.assert_close(engine.module.w.detach(), expected, rtol=8 * 2**-23, atol=0)
    assert engines["student"].get_lr()[0] == 0.25 and engines["disc"].get_lr()[0] == 0.5


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


def _checkpoints(run_dir, marked: list[int], unmarked: list[int]) -> None:
    from distsr.engine.ray_adapter import COMPLETE

    for step in marked + unmarked:
        (run_dir / f"step_{step:08d}").mkdir(parents=True)
        (run_dir / f"step_{step:08d}" / CLIENT_STATE).write_text(str(step))
    for step in marked:
        (run_dir / f"step_{step:08d}" / COMPLETE).write_text("")


def test_a_run_folder_checkpoint_without_the_marker_is_never_resumed(tmp_path):
    from distsr.engine.ray_adapter import resume_folder

    run = tmp_path / "run"
    _checkpoints(run, marked=[2], unmarked=[4])
    assert resume_folder(run, None) == run / "step_00000002"
    # Ray registered step 4 but its rank 0 died before marking it: not taken either
    assert resume_folder(run, str(run / "step_00000004")) == run / "step_00000002"
    assert resume_folder(tmp_path / "empty", None) is None
    _checkpoints(tmp_path / "none", marked=[], unmarked=[6])
    assert resume_folder(tmp_path / "none", str(tmp_path / "none" / "step_00000006")) is None


def test_the_newer_of_rays_checkpoint_and_the_newest_marked_folder_wins(tmp_path):
    from distsr.engine.ray_adapter import resume_folder

    run = tmp_path / "run"
    _checkpoints(run, marked=[2, 4, 6], unmarked=[8])
    # Ray's registry lags (the driver died right after a report): the marked folder is newer
    assert resume_folder(run, str(run / "step_00000004")) == run / "step_00000006"
    assert resume_folder(run, None) == run / "step_00000006"
    # Ray's checkpoint stored elsewhere (remote storage, no markers) and newer: Ray's wins
    remote = tmp_path / "bucket" / "run" / "step_00000010"
    assert resume_folder(run, str(remote)) == remote
    assert resume_folder(run, str(tmp_path / "bucket" / "run" / "step_00000004")) == (
        run / "step_00000006"
    )


def test_a_relaunch_removes_the_killed_launchs_folders_once_keep_newer_ones_are_complete(tmp_path):
    from distsr.engine.ray_adapter import COMPLETE, RayStore

    run = tmp_path / "run"
    # the killed launch left 2 and 4 complete and 6 half-written; this launch saved 8 and 10
    _checkpoints(run, marked=[2, 4, 8], unmarked=[6, 10])
    store = RayStore(0, run, keep=2, earlier=frozenset(f"step_{s:08d}" for s in (2, 4, 6)))
    store.prune_earlier()  # complete: 4, 8 -> 2 goes; 6 is newer than 4 and stays for now
    assert sorted(p.name for p in run.glob("step_*")) == [f"step_{s:08d}" for s in (4, 6, 8, 10)]
    (run / "step_00000010" / COMPLETE).write_text("")
    store.prune_earlier()  # complete: 8, 10 -> every earlier folder goes; this launch's stay
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000008", "step_00000010"]


def test_folders_in_rays_persisted_registry_are_left_to_ray(tmp_path):
    from distsr.engine.ray_adapter import RAY_SNAPSHOT, unknown_to_ray

    run = tmp_path / "run"
    _checkpoints(run, marked=[2, 4], unmarked=[6])
    assert unknown_to_ray(run) == {"step_00000002", "step_00000004", "step_00000006"}
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step_00000002", "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "step_00000004"}}  # fmt: skip
    (run / RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    assert unknown_to_ray(run) == {"step_00000006"}


def test_a_folder_the_relaunch_wrote_again_is_left_to_ray(tmp_path):
    from distsr.engine.ray_adapter import COMPLETE, RayStore

    run = tmp_path / "run"
    # the killed launch left 2, 4, 6; this one resumed from 4 and wrote 6 (same name) and 8
    _checkpoints(run, marked=[2, 4, 6, 8], unmarked=[])
    for step in (6, 8):
        (run / f"step_{step:08d}" / COMPLETE).write_text("all ranks uploaded; launch abc\n")
    earlier = frozenset(f"step_{s:08d}" for s in (2, 4, 6))
    RayStore(0, run, keep=2, earlier=earlier, launch="abc").prune_earlier()
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000006", "step_00000008"]
