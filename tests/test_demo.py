"""The README's main job, `python -m distsr.launch demo`, on a reduced size: every stage runs
for real (shards, Ray + DeepSpeed teacher training, Ray cache job, TAD-SR from the cache,
evaluation) and the report compares student, teacher and bicubic. The run is the session's
``demo_run`` (tests/conftest.py), which tests/test_readme.py runs the README after."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_pipeline_writes_the_report(demo_run):
    out, log = demo_run.out, demo_run.log
    assert demo_run.returncode == 0, log[-5000:]
    assert f"report: {out / 'report.md'}" in log
    # a successful run prints no traceback (launch.ray_session), except the one Ray Train's
    # controller logs with its warning when a resource request times out on an overloaded CPU
    # (Ray: "safe to ignore"); each such warning carries one
    transient = log.count("Failed to send resource request")
    assert log.count("Traceback (most recent call last)") <= transient, log[-5000:]
    # its private clusters keep their tokens out of the home (launch.private_cluster_env)
    assert demo_run.token_after == demo_run.token_before
    report = (out / "report.md").read_text()
    for column in ("bicubic", "teacher", "student", "psnr", "niqe", "brisque"):
        assert column in report.lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(list((out / "grids").glob("*.png"))) >= 3
    assert metrics  # per-image and mean tables
    # a second run resumes: every stage is found done and nothing is recomputed
    again = subprocess.run(demo_run.cmd, cwd=ROOT, env=demo_run.env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0
    assert again.stdout.count("done already") == 7  # 5 + the two KD stages (ncnn teacher)
