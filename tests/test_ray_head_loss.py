"""What losing the Ray head does to a run: the head (a real `ray start --head` on loopback, one
CPU: ``tests/raycluster.py``) is killed mid-run with every process of its node. The
driver (``python -m distsr.launch`` with ``RAY_ADDRESS``) must stop within its watch's
``HEAD_LOST_AFTER_S`` (``engine/head.py``; plus a poll) with exit status ``HEAD_LOST_EXIT`` and a
message naming the checkpoint to resume from, and the same command against a new head and the
same output folder must resume from exactly that checkpoint and finish."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distsr.engine.head import HEAD_LOST_AFTER_S, HEAD_LOST_EXIT
from tests.conftest import ROOT, tiny_overrides
from tests.ports import patience
from tests.raycluster import Cluster, complete, metrics, slurm

pytestmark = pytest.mark.slow
MAX_STEPS, EVERY = 15, 5


def launch(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def test_a_lost_head_stops_the_run_clearly_and_a_relaunch_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "runs" / "headloss"
    overrides = tiny_overrides(
        tmp_path / "runs", tiny_shards, "name=headloss", f"engine.max_steps={MAX_STEPS}",
        "engine.log_every=1", f"engine.checkpoint.every_steps={EVERY}", "engine.preview_every=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "distsr.launch", "resshift_tiny", *overrides]
    first = Cluster(tmp_path / "first")
    try:
        driver = launch(cmd, first.env, tmp_path / "first.log")
        try:
            slurm.wait_until(lambda: complete(run_dir), "the first complete checkpoint",
                             patience(600), driver, interval=0.1)  # fmt: skip
            os.killpg(first.head.pid, signal.SIGKILL)  # the head node is lost, all of it
            lost = time.monotonic()
            driver.wait(timeout=patience(HEAD_LOST_AFTER_S + 50))
            waited = time.monotonic() - lost
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    finally:
        first.stop()
    text = (tmp_path / "first.log").read_text()
    assert driver.returncode == HEAD_LOST_EXIT, text[-3000:]
    named = re.search(r"lost the Ray head: .* newest complete checkpoint is (\S+)\. Start", text)
    assert named, text[-3000:]
    newest = Path(named[1])
    assert newest.parent == run_dir and int(newest.name.split("_")[1]) == complete(run_dir)[-1]
    print(f"head lost: the driver stopped after {waited:.1f} s")

    second = Cluster(tmp_path / "second")
    try:
        driver = launch(cmd, second.env, tmp_path / "second.log")
        driver.wait(timeout=patience(600))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        second.stop()
    text = (tmp_path / "second.log").read_text()
    assert driver.returncode == 0, text[-3000:]
    step = int(newest.name.split("_")[1])
    assert f"resumed from {newest} at step {step} on 1 workers" in text, text[-3000:]
    steps = [m["step"] for m in metrics(run_dir)]
    # the relaunch logged every step after the checkpoint once, in order, up to the end
    assert steps[-(MAX_STEPS - step) :] == list(range(step + 1, MAX_STEPS + 1)), steps
