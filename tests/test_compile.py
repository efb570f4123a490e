"""``engine.compile`` and ``engine.channels_last``: a tiny in-process run with each on trains, its
first loss is the plain run's within a stated bound, and the option really acts (the module is
compiled; the convolutions see channels_last activations). The compiled arm uses the aot_eager
backend (Dynamo + AOTAutograd through the DeepSpeed engine, no code generation): inductor's cold
compile of the tiny UNet takes minutes on a 2-core CPU; jobs/bench_compile.py runs inductor."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distsr.config import CONFIG_DIR, load_yaml
from distsr.engine.build import in_channels_last
from distsr.engine.checkpoint import LocalStore
from distsr.engine.context import init_in_process
from distsr.engine.loop import Trainer
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import load_run_config
from tests.conftest import tiny_overrides
from tests.ulps import assert_close_ulps

pytestmark = pytest.mark.slow

ARMS = {"plain": [], "compile": ["engine.compile=true", "engine.compile_backend=aot_eager"],
        "channels_last": ["engine.channels_last=true"]}  # fmt: skip
# The first loss is computed before any update, from the same weights and batch: only the order
# of float operations differs (compiled graphs, oneDNN's channels_last convolutions). Measured
# here: channels_last 0 ulps, inductor 1 ulp; 256 ulps of float32 (~1.5e-5 relative) leaves room
# for other CPUs' kernels while failing on any real change (another noise draw: ~10^4 ulps).
FIRST_LOSS_ULPS = 256


def run_arm(tmp_path, shards, arm: str) -> dict:
    cfg = load_run_config("resshift_tiny", tiny_overrides(
        tmp_path, shards, f"name=arm_{arm}", "scaling.ray=false", "scaling.num_workers=1",
        "engine.zero_stage=0", "engine.max_steps=2", "engine.log_every=1",
        "engine.checkpoint.every_steps=2", "engine.tensorboard=false", "engine.preview_every=0",
        "engine.ema_decay=null", *ARMS[arm],
    ))  # fmt: skip
    trainer = Trainer(cfg, init_in_process(), LocalStore(cfg.run_dir, keep=1))
    module = trainer.engines["unet"].module
    formats: list[bool] = []
    conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    hook = conv.register_forward_hook(  # the layout of the activations the first conv sees
        lambda _m, inputs, _out: formats.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    try:
        trainer.run()
    finally:
        hook.remove()
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        "losses": [json.loads(line)["loss/unet"] for line in lines],
        "compiled": trainer.engines["unet"].is_compiled,
        "channels_last": formats,
        "export": load_file(cfg.run_dir / "export" / "unet.safetensors"),
    }


@pytest.fixture(scope="module")
def arms(tiny_shards, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("compile")
    return {arm: run_arm(root, tiny_shards, arm) for arm in ARMS}


@pytest.mark.parametrize("arm", ["compile", "channels_last"])
def test_a_tiny_run_with_the_option_trains_and_starts_at_the_plain_runs_loss(arms, arm):
    off, on = arms["plain"], arms[arm]
    assert len(on["losses"]) == 2 and all(math.isfinite(x) for x in on["losses"])
    assert on["losses"][1] != on["losses"][0]  # it trained: the second batch met new weights
    assert_close_ulps(torch.tensor(on["losses"][0], dtype=torch.float32),
                      torch.tensor(off["losses"][0], dtype=torch.float32),
                      FIRST_LOSS_ULPS, msg=f"{arm} first loss")  # fmt: skip
    # the exported weights keep their names (compile works in place, no ``_orig_mod.``)
    assert on["export"].keys() == off["export"].keys()


def test_the_options_act(arms):
    assert not arms["plain"]["compiled"] and arms["compile"]["compiled"]
    assert arms["plain"]["channels_last"] and not any(arms["plain"]["channels_last"])
    assert arms["channels_last"]["channels_last"] and all(arms["channels_last"]["channels_last"])


def test_in_channels_last_keeps_the_modules_outside_nchw():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 1))
    x = torch.rand(2, 3, 8, 8)
    want = net(x)
    seen = []
    net[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    got = in_channels_last(net)(x)
    assert seen == [(8 * 8 * 8, 1, 8 * 8, 8)]  # inside: the second conv's input is NHWC in memory
    assert got.is_contiguous() and got.shape == want.shape  # outside: NCHW
    assert_close_ulps(got, want.detach(), 16, scale="tensor", msg="channels_last conv")


def test_the_benchmark_times_every_arm_side_by_side(tiny_shards, tmp_path):
    from distsr.bench.compile import BenchCompileConfig, bench_compile
    from distsr.config import from_dict

    (tmp_path / "shards").symlink_to(tiny_shards)  # the bench's data, already written
    job = {"output": str(tmp_path), "arms": ["plain", "channels_last"], "steps": 2, "warmup": 1,
           "repeats": 2}  # fmt: skip
    cfg = from_dict(BenchCompileConfig, job)
    summary = bench_compile(cfg)
    rows = summary["arms"]
    assert set(rows) == {"plain", "channels_last"}
    assert all(len(r["train"]) == len(r["infer"]) == 2 for r in rows.values())
    assert all(x > 0 for r in rows.values() for x in r["train"] + r["infer"])
    # each round's ratio is that round's rate over plain's (the same round: same load), and the
    # table shows their median
    table = (tmp_path / "bench_compile.md").read_text()
    assert table == summary["table"] and table.count("\n") == 4  # header, rule, two arms
    for kind in ("train", "infer"):
        for arm, row in rows.items():
            want = [a / b for a, b in zip(row[kind], rows["plain"][kind], strict=True)]
            assert row[f"{kind}_vs_plain"] == want, (arm, kind)
    line = next(x for x in table.splitlines() if x.startswith("| channels_last |"))
    ratios = rows["channels_last"]
    train, infer = (statistics.median(ratios[f"{k}_vs_plain"]) for k in ("train", "infer"))
    assert f"| {train:.2f}x | {infer:.2f}x |" in line
    # the student it timed is resshift_tiny's UNet, counted here from the config
    unet = UNetModelSwin(**load_yaml(CONFIG_DIR / "resshift_tiny.yaml")["method"]["unet"])
    assert summary["student"]["engine"] == "unet"
    assert summary["student"]["parameters"] == sum(p.numel() for p in unet.parameters())
