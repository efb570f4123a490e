"""End-to-end training of the tiny ResShift teacher on the real stack: WebDataset shards made
from real photos, DeepSpeed engines over gloo, Ray Train workers on a local Ray cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distsr.engine.ray_adapter import RAY_SNAPSHOT
from distsr.launch import run
from distsr.runconfig import load_run_config
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ray_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("step_*") if (p / "client_state.pt").exists())


def launch_cmd(run_root: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distsr.launch", "resshift_tiny",
            *tiny_overrides(run_root, shards, *extra)]  # fmt: skip


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"launch exited early with {proc.returncode}")
        time.sleep(1)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_launch_trains_with_two_ray_workers_then_resumes_after_kill(tiny_shards, tmp_path):
    """The CLI on a private local Ray cluster, 2 workers, ZeRO-2: killed after a checkpoint,
    launched again with the same name, it resumes from the newest checkpoint and finishes."""
    cmd = launch_cmd(
        tmp_path, tiny_shards, "engine.max_steps=40", "engine.log_every=5",
        "engine.checkpoint.every_steps=10", "engine.zero_stage=2",
    )  # fmt: skip
    run_dir = tmp_path / "resshift_tiny"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    try:
        wait_for_step(run_dir, first, 15, timeout=400)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = max(m["step"] for m in read_metrics(run_dir))
    saved = ray_checkpoints(run_dir)
    assert saved, "a checkpoint must exist before the kill"
    newest = int(saved[-1].split("_")[1])
    assert killed_at < 40

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    # Ray's workers outlive the killed driver for a moment and may still complete the checkpoint
    # they were writing, so the newest complete one is read from the resume line, not guessed
    found = re.search(r"resumed from \S+ at step (\d+)", out)
    assert found, out[-4000:]
    start = int(found.group(1))
    assert start >= newest and start % 10 == 0  # a checkpoint step (every_steps=10)
    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics]
    # the second launch logs the steps after the checkpoint it resumed from, each once; the
    # killed run's workers may have logged a step or two more before they died
    resumed = list(range(start + 5, 41, 5))
    assert steps[-len(resumed) :] == resumed and steps.count(start) <= 1, steps
    losses = [m["loss/unet"] for m in metrics]
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    assert ray_checkpoints(run_dir)[-1] == "step_00000040"
    # keep: 2, the killed launch's unregistered folders included (Ray's registry is where the
    # driver looks for which folders Ray will prune itself)
    assert len(ray_checkpoints(run_dir)) <= 2
    assert (run_dir / RAY_SNAPSHOT).is_file()
    assert (run_dir / "config.yaml").exists() and (run_dir / "run.yaml").exists()
    # TensorBoard shows one curve: the resumed writer purged what the killed run logged past
    # the checkpoint
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/unet")] == list(range(5, 41, 5))


def test_worker_killed_mid_run_is_restarted_from_last_checkpoint(
    ray_cluster, tiny_shards, tmp_path
):
    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=failing", "engine.max_steps=12", "engine.log_every=2",
            "engine.checkpoint.every_steps=4", "debug.fail_at_step=6", "debug.fail_rank=1",
            "debug.fail_mode=sigkill",
        ),
    )  # fmt: skip
    final = run(cfg)
    assert final["step"] == 12
    assert (cfg.run_dir / ".injected_failure_step6").exists()
    steps = [m["step"] for m in read_metrics(cfg.run_dir)]
    # steps 2..6 ran, the worker died at 6, the group restarted from step 4 and logged 6 again
    assert steps.count(6) == 2 and steps[-1] == 12
    assert steps.index(6) < steps.index(8)
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["restarts"] == 1 and status["state"] == "finished"


def test_worker_killed_while_checkpointing_resumes_from_the_previous_complete_one(
    ray_cluster, tiny_shards, tmp_path
):
    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=killckpt", "engine.max_steps=6", "engine.log_every=1",
            "engine.checkpoint.every_steps=2", "debug.fail_at_step=4", "debug.fail_rank=1",
            "debug.fail_mode=sigkill", "debug.fail_in_checkpoint=true",
        ),
    )  # fmt: skip
    final = run(cfg)
    assert final["step"] == 6
    steps = [m["step"] for m in read_metrics(cfg.run_dir)]
    # died while writing step 4's checkpoint: that one was never registered, so the restart
    # resumed from step 2 and ran steps 3 and 4 again
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]
    state = torch.load(cfg.run_dir / "step_00000004" / "client_state.pt", weights_only=False)
    assert state["step"] == 4


def test_in_process_run_resumes_and_keeps_ema(tiny_shards, tmp_path):
    """The resumed run continues the saved EMA: its shadow after step 5 is exactly the saved
    step-4 shadow moved towards the step-5 weights (a lost or rebuilt EMA fails this)."""
    from safetensors.torch import load_file

    base = tiny_overrides(
        tmp_path, tiny_shards, "name=inproc", "scaling.ray=false", "scaling.num_workers=1",
        "engine.log_every=1", "engine.checkpoint.every_steps=2", "engine.zero_stage=0",
    )  # fmt: skip
    first = run(load_run_config("resshift_tiny", [*base, "engine.max_steps=4"]))
    assert first["step"] == 4
    ckpt = tmp_path / "inproc" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002", "step_00000004"]
    ema_before = torch.load(ckpt / "step_00000004" / "client_state.pt", weights_only=False)["ema"]
    second = run(load_run_config("resshift_tiny", [*base, "engine.max_steps=5"]))
    assert second["step"] == 5
    steps = [m["step"] for m in read_metrics(tmp_path / "inproc")]
    assert steps == [1, 2, 3, 4, 5]
    weights = load_file(tmp_path / "inproc" / "export" / "unet.safetensors")  # after step 5
    ema = load_file(tmp_path / "inproc" / "export" / "unet_ema.safetensors")
    decay = ema_before["unet"]["decay"]
    for name, shadow in ema_before["unet"]["shadow"].items():
        # EMA.update's own operation on the same fp32 tensors: bit-equal
        assert torch.equal(ema[name], shadow.clone().lerp_(weights[name], 1 - decay)), name
        assert not torch.equal(ema[name], weights[name])
    # launched once more after its end: trains nothing, returns the last logged metrics
    again = run(load_run_config("resshift_tiny", [*base, "engine.max_steps=5"]))
    assert again == read_metrics(tmp_path / "inproc")[-1] and "step_time" in again
    assert [m["step"] for m in read_metrics(tmp_path / "inproc")] == [1, 2, 3, 4, 5]


def test_corrupt_shards_are_skipped_counted_and_training_continues(tiny_shards, tmp_path):
    import shutil

    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    good = shutil.copy(sorted(tiny_shards.glob("*.tar"))[0], shards)
    data = Path(good).read_bytes()
    (shards / "train-000090.tar").write_bytes(data[: len(data) // 3])  # truncated mid-file
    with wds.TarWriter(str(shards / "train-000091.tar")) as sink:
        for i in range(8):
            sink.write({"__key__": f"bad{i}", "gt.png": b"not a png", "lq.png": b"x",
                        "meta.json": b"{}"})  # fmt: skip
    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, shards, "name=corrupt", "scaling.ray=false", "scaling.num_workers=1",
            "engine.max_steps=30", "engine.log_every=30", "engine.zero_stage=0",
        ),
    )  # fmt: skip
    final = run(cfg)
    assert final["step"] == 30
    assert final["skipped_samples"] > 0
    state = torch.load(
        cfg.run_dir / "checkpoints" / "step_00000030" / "client_state.pt", weights_only=False
    )
    assert state["skipped_samples"] == final["skipped_samples"]
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["skipped_samples"] == final["skipped_samples"] and status["state"] == "finished"


def test_exported_weights_load_strictly_into_the_official_architecture(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from distsr.models.resshift_unet import UNetModelSwin

    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=export", "scaling.ray=false", "scaling.num_workers=1",
            "engine.max_steps=2", "engine.zero_stage=0",
        ),
    )  # fmt: skip
    run(cfg)
    unet = UNetModelSwin(**cfg.method.unet)
    for name in ("unet", "unet_ema"):
        state = load_file(cfg.run_dir / "export" / f"{name}.safetensors")
        unet.load_state_dict(state, strict=True)
    raw = load_file(cfg.run_dir / "export" / "unet.safetensors")
    ema = load_file(cfg.run_dir / "export" / "unet_ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all_ranks(ray_cluster, tiny_shards, tmp_path):
    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=nan", "engine.max_steps=5", "engine.log_every=1",
            "engine.checkpoint.every_steps=5", "debug.nonfinite_at_steps=[2,3]",
            "debug.nonfinite_rank=1",
        ),
    )  # fmt: skip
    final = run(cfg)
    assert final["step"] == 5
    assert final["nonfinite_steps"] == 2  # counted on rank 0: the flag reached it
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["nonfinite_steps"] == 2
    assert status["last_checkpoint"] == "step_00000005"
    # if rank 0 had stepped while rank 1 skipped, ZeRO's collectives would hang or diverge;
    # both ranks saved the same number of optimizer steps
    state = torch.load(cfg.run_dir / "step_00000005" / "client_state.pt", weights_only=False)
    assert state["step"] == 5 and state["nonfinite_steps"] == 2


def test_too_many_nonfinite_losses_in_a_row_stop_with_a_clear_message(tiny_shards, tmp_path):
    cfg = load_run_config(
        "resshift_tiny",
        tiny_overrides(
            tmp_path, tiny_shards, "name=nanstop", "scaling.ray=false", "scaling.num_workers=1",
            "engine.max_steps=6", "engine.checkpoint.every_steps=1", "engine.zero_stage=0",
            "engine.max_nonfinite_in_row=3", "debug.nonfinite_at_steps=[2]",
            "debug.nonfinite_repeat=10",
        ),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="NaN/inf on 3 micro-batches in a row at step 2"):
        run(cfg)
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["last_checkpoint"] == "step_00000002"
