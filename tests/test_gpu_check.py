"""``jobs/gpu_check.py`` at tiny size on the CPU: the same code a GPU runs at released size.

Its FLOPs are checked against torch's counter on a network built here, its MFU and samples/s
against the seconds it reports; nothing is timed against a bound (this machine is shared)."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from distsr.config import CONFIG_DIR, load_yaml
from distsr.models.resshift_unet import UNetModelSwin
from distsr.plan.hardware import peak_flops
from tests.conftest import load_job


def resshift_step_flops() -> float:
    """Forward + backward FLOPs of the tiny ResShift UNet at batch 1, counted here."""
    kwargs = load_yaml(CONFIG_DIR / "tadsr_tiny.yaml")["method"]["teacher"]["unet"]
    net, side = UNetModelSwin(**kwargs), kwargs["lq_size"]
    x, lq = torch.randn(1, 3, side, side), torch.randn(1, 3, side, side)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.tensor([3]), lq=lq).square().mean().backward()
    return float(counter.get_total_flops())


def test_gpu_check_runs_at_tiny_size_on_the_cpu(tmp_path, one_thread):
    result = load_job("gpu_check").main(["size=tiny", f"out={tmp_path}"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["options"]["device"] == "cpu" and report["options"]["size"] == "tiny"
    train = report["resshift_train"]
    assert train["flops_per_step"] == resshift_step_flops()
    seconds = train["seconds_per_step"]["median"]
    assert train["samples_per_s"] == 1 / seconds  # batch 1
    assert train["mfu"] == train["flops_per_step"] / seconds / peak_flops("cpu", "fp32")
    assert report["seesr_train"]["flops_per_step"] > 0 and report["seesr_train"]["params"] > 0
    speed = report["cache_vs_live"]
    assert speed["flops_per_step_live"] > speed["flops_per_step_cached"] > 0
    arms = report["infer"]["arms"]
    assert arms["teacher"]["flops"] > arms["student"]["flops"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table == result["table"] and "TAD-SR step, cached / live" in table
