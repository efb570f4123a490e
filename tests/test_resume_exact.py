"""Resume is exact. A run killed from outside (SIGKILL at whatever step it had reached) and
launched again ends with the same weights, bit for bit, as a run that never stopped; and for
ZeRO stages 0-3 and both recipes what a resume loads equals what the run held when it saved:
parameters, optimizer moments and master weights, LR schedule, EMA shadow, RNG, step, samples
seen and the data stream's position."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distsr.config import CONFIG_DIR, load_yaml
from distsr.engine.build import gathered
from distsr.engine.checkpoint import LocalStore, rng_state
from distsr.engine.context import init_in_process
from distsr.engine.loop import Trainer
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import load_run_config
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- killed from outside

EXACT = [
    "scaling.ray=false", "scaling.num_workers=1", "engine.zero_stage=0", "engine.max_steps=14",
    "engine.log_every=1", "engine.checkpoint.every_steps=4", "engine.preview_every=3",
    "engine.tensorboard=false", "data.num_workers=2", "data.shuffle=8",
]  # fmt: skip


def launch(tmp_path: Path, shards: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distsr.launch", "resshift_tiny",
           *tiny_overrides(tmp_path, shards, f"name={name}", *EXACT)]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "a")  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def status(run_dir: Path) -> dict:
    path = run_dir / "status.json"  # replaced atomically by the run
    return json.loads(path.read_text()) if path.is_file() else {}


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]


def test_run_killed_from_outside_ends_bit_identical_to_an_uninterrupted_one(tiny_shards, tmp_path):
    reference = launch(tmp_path, tiny_shards, "whole")
    finish(reference, tmp_path / "whole.log")

    run_dir = tmp_path / "killed"
    proc = launch(tmp_path, tiny_shards, "killed")
    deadline = time.time() + 300
    try:  # kill once the run is past its first checkpoint (step 4), wherever it then is
        while not (status(run_dir).get("step", 0) > 5 and status(run_dir)["last_checkpoint"]):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() < deadline, "the run never got past its first checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = status(run_dir)
    assert killed["state"] == "running" and killed["step"] < 14
    assert not (run_dir / "export").exists()

    finish(launch(tmp_path, tiny_shards, "killed"), tmp_path / "killed.log")
    log = (tmp_path / "killed.log").read_text()
    resumed_at = int(log.split("at step ")[1].split()[0])
    assert "resumed from" in log and 4 <= resumed_at <= killed["step"]
    for name in ("unet", "unet_ema"):
        want = load_file(tmp_path / "whole" / "export" / f"{name}.safetensors")
        got = load_file(run_dir / "export" / f"{name}.safetensors")
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # every loss logged after the resume is the uninterrupted run's, bit for bit
    whole = {m["step"]: m["loss/unet"] for m in read_jsonl(tmp_path / "whole" / "metrics.jsonl")}
    after = read_jsonl(run_dir / "metrics.jsonl")[-(14 - resumed_at) :]
    assert [m["step"] for m in after] == list(range(resumed_at + 1, 15))
    assert all(m["loss/unet"] == whole[m["step"]] for m in after)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- state round trip


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = UNetModelSwin(**load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"])
    path = tmp_path_factory.mktemp("teacher") / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def snapshot(trainer: Trainer) -> dict:
    """Everything a resume must restore, as plain tensors and values."""
    out = {"step": trainer.step, "samples_seen": trainer.samples_seen, "rng": rng_state()}
    for name, engine in trainer.engines.items():
        with gathered(engine):
            out[f"{name}.params"] = {n: p.detach().clone() for n, p in
                                     engine.module.named_parameters()}  # fmt: skip
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's
        # the moments in the optimizer's order (ZeRO-3 swaps the groups' tensors: no state_dict)
        out[f"{name}.moments"] = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                                  for st in base.state.values()]  # fmt: skip
        assert all(m for m in out[f"{name}.moments"]) or trainer.step == 0
        out[f"{name}.master"] = [p.detach().clone() for g in base.param_groups for p in g["params"]]
        out[f"{name}.lr"] = {k: v for k, v in engine.lr_scheduler.state_dict().items()
                             if k != "lr_lambdas"}  # fmt: skip
    for name, ema in trainer.emas.items():
        out[f"{name}.ema"] = {k: v.clone() for k, v in ema.shadow.items()}
    return out


def differences(want, got, where: str = "") -> list[str]:
    if isinstance(want, dict):
        if set(want) != set(got):
            return [f"{where}: keys {sorted(set(want) ^ set(got))}"]
        return [d for k in want for d in differences(want[k], got[k], f"{where}.{k}")]
    if isinstance(want, list | tuple):
        if len(want) != len(got):
            return [f"{where}: length"]
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]  # fmt: skip
    if isinstance(want, torch.Tensor):
        return [] if torch.equal(want, got) else [where]
    if isinstance(want, np.ndarray):
        return [] if np.array_equal(want, got) else [where]
    return [] if want == got else [f"{where}: {want!r} != {got!r}"]


RECIPES = {
    "resshift_tiny": [],
    "tadsr_tiny": ["engine.scheduler.warmup_steps=2"],
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("config", list(RECIPES))
def test_resume_loads_exactly_what_was_saved(tiny_shards, teacher_weights, tmp_path, config, stage):
    """World size 1 in this process: a run saves at step 2; a trainer built with another seed
    (other initial weights, RNG and stream) restores it and then holds the saved run's state."""
    extra = [f"method.teacher.unet_checkpoint={teacher_weights}"] if config == "tadsr_tiny" else []
    cfg = load_run_config(config, tiny_overrides(
        tmp_path, tiny_shards, "scaling.ray=false", "scaling.num_workers=1",
        f"engine.zero_stage={stage}", "engine.max_steps=2", "engine.checkpoint.every_steps=2",
        "engine.log_every=1", "engine.tensorboard=false", "engine.preview_every=0",
        *RECIPES[config], *extra,
    ))  # fmt: skip
    ctx = init_in_process()
    store = LocalStore(cfg.run_dir, keep=2)
    saved_run = Trainer(cfg, ctx, store)
    saved_run.run()
    saved = snapshot(saved_run)
    saved_data = saved_run.loader.state_dict()
    if config == "tadsr_tiny":
        assert set(saved_run.engines) == {"disc", "student"}  # the discriminator is restored too
    assert saved["step"] == 2 and saved_data["batches"] == 2

    other = Trainer(dataclasses.replace(cfg, seed=cfg.seed + 1), ctx, store)
    before = snapshot(other)
    assert differences(saved, before)  # the comparison can fail: params, moments, lr, RNG differ
    other.restore()
    assert differences(saved, snapshot(other)) == []
    assert other.data_state == saved_data
