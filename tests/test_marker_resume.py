"""The COMPLETE marker on a real Ray run: a driver killed right after its workers' report
resumes from the newest marked checkpoint, which Ray's own registry never saw. (The rules of
``resume_folder`` on folders alone: tests/test_engine_units.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distsr.engine.ray_adapter import COMPLETE
from distsr.launch import run
from distsr.runconfig import load_run_config
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def read_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def wait_for(ready, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` (a real event: a file, the cluster's free CPUs) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, f"the launch exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.01)


def test_driver_killed_right_after_report_resumes_from_the_newest_marked_checkpoint(
    ray_cluster, tiny_shards, tmp_path
):
    """Ray Train's controller registers a reported checkpoint when it polls the workers; here it
    polls every 10 minutes (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so the driver, killed as soon
    as step 2's folder is marked, dies with step 2 reported, uploaded and marked but unknown to
    Ray (the next report, step 4's, waits for that poll and is never marked). Launched again,
    the run must resume from step 2, not start over."""
    overrides = tiny_overrides(
        tmp_path, tiny_shards, "name=killed_driver", "engine.max_steps=4", "engine.log_every=1",
        "engine.checkpoint.every_steps=2", "engine.zero_stage=1", "engine.preview_every=0",
    )  # fmt: skip
    run_dir = tmp_path / "killed_driver"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "600",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}  # fmt: skip
    cpus = ray_cluster.cluster_resources()["CPU"]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "distsr.launch", "resshift_tiny", *overrides], cwd=ROOT,
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for((run_dir / "step_00000002" / COMPLETE).is_file, "marked step 2", 300, driver)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have failed on its own
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    # Ray ends the dead driver's controller and workers: wait until their CPUs are free again
    wait_for(lambda: ray_cluster.available_resources().get("CPU", 0) == cpus,
             "CPUs back from the dead driver's workers", 60)  # fmt: skip
    marked = sorted(p.parent.name for p in run_dir.glob(f"step_*/{COMPLETE}"))
    assert marked == ["step_00000002"], marked
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray's registry, persisted
    assert not snapshot.exists() or "step_00000002" not in snapshot.read_text()
    logged = len(read_steps(run_dir))

    final = run(load_run_config("resshift_tiny", overrides))
    assert final["step"] == 4
    assert read_steps(run_dir)[logged:] == [3, 4]  # resumed at 2: steps 1 and 2 not run again
    state = torch.load(run_dir / "step_00000004" / "client_state.pt", weights_only=False)
    assert state["step"] == 4 and state["samples_seen"] == 4 * 4 * 2
    assert (run_dir / "step_00000004" / COMPLETE).is_file()
