"""jobs/bench_kd.py on a tiny setting: real shards of the bundled photos, two real pretrained
ncnn teachers (small ones), the in-process cache job and engine, four student variants, and the
evaluation table (its shape, not its numbers); then the students load back as predictors."""

from __future__ import annotations

import json

import pytest
import torch

from distsr.evaluate.bench_kd import VARIANTS
from distsr.inference.predictors import load_predictor
from distsr.inference.sr_predictor import SRNet
from distsr.models.ncnn import find_ncnn_models
from distsr.models.sr import load_sr
from distsr.upscale.cli import main as upscale_main
from tests.conftest import load_job

TEACHERS = ["srmdnf-x4", "realesr-animevideov3-x4"]  # the two small x4 networks of the wheels

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not set(TEACHERS) <= set(find_ncnn_models()), reason="needs the [teachers] wheels"
    ),  # fmt: skip
]


def test_bench_kd_writes_a_row_per_baseline_teacher_and_student(tmp_path):
    out = tmp_path / "bench"
    argv = [f"output={out}", f"teachers={TEACHERS}".replace("'", ""), "crop_size=32",
            "stride=256", "steps=3", "aggregator_steps=2", "batch_size=4", "eval_size=32",
            "metrics=[psnr,ssim]",  # a nested section given whole: from_dict fills the rest
            "aggregator={channels: 8, blocks: 1, heads: 2, mean_skip: true}"]  # fmt: skip
    summary = load_job("bench_kd").main(argv)

    lines = summary["table"].strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["model", "PSNR-Y ↑", "SSIM-Y ↑", "params", "train s"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(head) for r in rows)
    names = [r[0] for r in rows]
    assert names[0] == "bicubic"
    assert names[1:3] == [f"teacher {t}" for t in TEACHERS]
    assert names[3].startswith("teacher: DCTSwin aggregation")
    assert [n.split(")")[0] for n in names[4:]] == ["student (a", "student (b", "student (c",
                                                    "student (d"]  # fmt: skip
    for r in rows:
        float(r[1]), float(r[2])  # every predictor scored
    assert all(float(r[4]) >= 0 for r in rows[4:])  # students carry their training time
    assert (out / "bench_kd.md").read_text().startswith(lines[0])
    assert json.loads((out / "bench_kd.json").read_text())["table"] == summary["table"]
    assert summary["notes"] == []  # every teacher installed, NIQE not asked for

    # each student run loads back as a predictor, the exported weights under official names
    for variant in VARIANTS:
        run_dir = out / "runs" / f"student_{variant}"
        sr = load_predictor(run_dir, "ema", device="cpu")
        assert isinstance(sr, SRNet) and sr.scale == 4
        lq = torch.rand(1, 3, 8, 8)
        official = load_sr(run_dir / "export" / "student_ema.safetensors").net
        assert torch.equal(sr(lq), official(lq).clamp(0, 1))
    # and exports in the official format (BasicSR "params"), which loads back the same
    pth = tmp_path / "student.pth"
    assert upscale_main(["export", "--checkpoint", str(run_dir), str(pth)]) == 0
    assert torch.equal(load_sr(pth).net(lq).clamp(0, 1), sr(lq))
    # the aggregator stage exports no single-pass student: one clear error
    with pytest.raises((ValueError, FileNotFoundError), match="exports no network|no exported"):
        load_predictor(out / "runs" / "aggregator", "ema", device="cpu")
