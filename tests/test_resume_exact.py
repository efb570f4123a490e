"""Resume is exact. A run killed from outside (SIGKILL at whatever step it had reached) and
launched again ends with the same weights, bit for bit, as a run that never stopped: in-process,
and with two Ray workers at ZeRO-1/2/3 and with a ZeRO-3-partitioned TAD-SR teacher; and for
ZeRO stages 0-3 and both recipes what a resume loads equals what the run held when it saved:
parameters, optimizer moments and master weights, LR schedule, EMA shadow, RNG, step, samples
seen and the data stream's position."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
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
from distsr.engine.ray_adapter import COMPLETE
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import load_run_config
from tests.conftest import ROOT, tiny_overrides
from tests.ports import patience

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- killed from outside

EXACT = [
    "scaling.ray=false", "scaling.num_workers=1", "engine.zero_stage=0", "engine.max_steps=14",
    "engine.log_every=1", "engine.checkpoint.every_steps=4", "engine.preview_every=3",
    "engine.tensorboard=false", "data.num_workers=2", "data.shuffle=8",
]  # fmt: skip


def launch(tmp_path: Path, shards: Path, name: str, config: str = "resshift_tiny",
           args: list[str] = EXACT) -> subprocess.Popen:  # fmt: skip
    """``python -m distsr.launch`` as its own session (its process group is the session's)."""
    cmd = [sys.executable, "-m", "distsr.launch", config,
           *tiny_overrides(tmp_path, shards, f"name={name}", *args)]  # fmt: skip
    log = open(tmp_path / f"{name}.log", "a")  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a private Ray cluster of its own, never another one
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
    resumed_at = assert_resumed_as_uninterrupted(tmp_path / "whole", run_dir, max_steps=14)
    assert 4 <= resumed_at <= killed["step"]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "unet.safetensors", "unet_ema.safetensors"]  # fmt: skip


def assert_resumed_as_uninterrupted(whole: Path, run_dir: Path, max_steps: int) -> int:
    """The relaunched run (its log: ``<run_dir>.log``) ends with the exported weights and EMA of
    the uninterrupted one, bit for bit, and logged the same losses and gradient norms after the
    step it resumed from (returned)."""
    found = re.findall(r"resumed from \S+ at step (\d+)", run_dir.with_suffix(".log").read_text())
    assert found, "the relaunch did not resume"
    resumed_at = int(found[-1])
    exported = sorted(p.name for p in (whole / "export").iterdir())
    assert any(name.endswith("_ema.safetensors") for name in exported), exported
    assert exported == sorted(p.name for p in (run_dir / "export").iterdir())
    for name in exported:
        want, got = load_file(whole / "export" / name), load_file(run_dir / "export" / name)
        assert want.keys() == got.keys()
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], name
    # every loss and norm logged after the resume is the uninterrupted run's, bit for bit (the
    # killed launch's lines before them may include steps it ran past its checkpoint)
    reference = {m["step"]: m for m in read_jsonl(whole / "metrics.jsonl")}
    after = read_jsonl(run_dir / "metrics.jsonl")[-(max_steps - resumed_at) :]
    assert [m["step"] for m in after] == list(range(resumed_at + 1, max_steps + 1))
    for m in after:
        want = reference[m["step"]]
        keys = [k for k in want if k.startswith(("loss/", "grad_norm/"))]
        assert keys and {k: m[k] for k in keys} == {k: want[k] for k in keys}, m["step"]
    return resumed_at


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- two Ray workers, killed

# 24 steps: a tiny step takes ~0.2 s, and the kill must land while training goes on (with 12 the
# run once reached its end before the poll saw step 4's marker)
WS2_STEPS = 24
WS2 = [
    "scaling.num_workers=2", f"engine.max_steps={WS2_STEPS}", "engine.log_every=1",
    "engine.checkpoint.every_steps=4", "engine.preview_every=3", "engine.tensorboard=false",
    "data.num_workers=1", "data.shuffle=8",
]  # fmt: skip
# ZeRO-1 is left out: it shares DeepSpeed's stage-1/2 optimizer and its checkpoint layout
# with ZeRO-2; ZeRO-3 runs in the TAD-SR case (its student and discriminator engines, and the
# partitioned teacher). Every stage's round trip is in test_resume_loads_exactly_what_was_saved.
WS2_CASES = {  # id -> config, overrides
    "zero2": ("resshift_tiny", ["engine.zero_stage=2"]),
    "tadsr_zero3_teacher": ("tadsr_tiny", ["engine.zero_stage=3",
                                           "method.teacher_partition=zero3"]),
}  # fmt: skip


def past_complete_checkpoint(run_dir: Path) -> bool:
    """Rank 0 reports a checkpoint that every rank uploaded (marked COMPLETE) and a later step."""
    now = status(run_dir)
    ckpt = now.get("last_checkpoint")
    if not ckpt or not (run_dir / ckpt / COMPLETE).is_file():
        return False
    return now["step"] > int(ckpt.removeprefix("step_"))


def session_processes(sid: int) -> list[int]:
    """The processes still in session ``sid``: a killed launch's Ray workers, which are not in
    its process group, live on until they notice their raylet is gone."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    alive.append(int(entry))
    return alive


def kill_past_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 400) -> dict:
    """SIGKILL the launch's process group (driver, GCS, raylet) once training is past a complete
    checkpoint; return the run's status once no process of the launch is left to write."""
    deadline = time.time() + patience(timeout)
    try:
        while not past_complete_checkpoint(run_dir):
            assert proc.poll() is None, run_dir.with_suffix(".log").read_text()[-4000:]
            assert time.time() < deadline, "the run never got past a complete checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + patience(120)
    while left := session_processes(proc.pid):
        assert time.time() < deadline, f"processes {left} of the killed launch live on"
        time.sleep(0.1)
    return status(run_dir)


@pytest.mark.parametrize("case", list(WS2_CASES))
def test_two_worker_run_killed_from_outside_ends_bit_identical_to_an_uninterrupted_one(
    tiny_shards, teacher_weights, tmp_path, case
):
    """World size 2 (two Ray Train workers on the launch's private Ray cluster): ZeRO-1/2/3 and
    TAD-SR with its teacher partitioned by ZeRO-3. Bit-identical, not within a bound: both runs
    reduce over the same 2 ranks with the same partitioning, so every sum runs in the same
    order, and a 2-rank average is exact anyway ((a + b) / 2 = (b + a) / 2)."""
    config, extra = WS2_CASES[case]
    args = [*WS2, *extra]
    if config == "tadsr_tiny":
        args.append(f"method.teacher.unet_checkpoint={teacher_weights}")
    finish(launch(tmp_path, tiny_shards, "whole", config, args), tmp_path / "whole.log")

    run_dir = tmp_path / "killed"
    killed = kill_past_checkpoint(launch(tmp_path, tiny_shards, "killed", config, args), run_dir)
    assert killed["state"] == "running" and killed["step"] < WS2_STEPS, killed
    assert not (run_dir / "export").exists()

    finish(launch(tmp_path, tiny_shards, "killed", config, args), tmp_path / "killed.log")
    resumed_at = assert_resumed_as_uninterrupted(tmp_path / "whole", run_dir, WS2_STEPS)
    assert resumed_at % 4 == 0 and 4 <= resumed_at <= killed["step"]


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
