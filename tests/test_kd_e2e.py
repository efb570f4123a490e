"""DTKD and MTKD end to end on the real stack: tiny random-weight teachers, shards from real
photos, the teacher cache written by the Ray caching job, 2 Ray Train workers with DeepSpeed
ZeRO-2, and a worker killed (SIGKILL) mid-run that the group resumes from its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distsr.data.cache import TeacherCache
from distsr.data.reader import make_train_loader
from distsr.engine.checkpoint import step_name
from distsr.launch import run
from distsr.models.resshift_unet import UNetModelSwin
from distsr.models.sr import build_sr, load_sr
from distsr.recipes.kd import build_student
from distsr.runconfig import RunConfig, load_run_config
from tests.conftest import ROOT, load_job, tiny_overrides
from tests.kd_reference import assert_loss, dtkd_loss, mtkd_loss

pytestmark = pytest.mark.slow

KILL = ["engine.max_steps=8", "engine.log_every=1", "engine.checkpoint.every_steps=4",
        "engine.zero_stage=2", "scaling.ray=true", "scaling.num_workers=2",
        "debug.fail_at_step=6", "debug.fail_rank=1", "debug.fail_mode=sigkill"]  # fmt: skip


def method(config: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["method"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cache(*argv: str) -> str:
    summary = load_job("cache_teacher").main([*argv, "num_actors=2"])
    assert not summary["failed"] and summary["cached"] == summary["shards"]
    return summary["cache_dir"]


def train_killed_and_resumed(config: str, tmp_path: Path, shards: Path, *extra: str):
    """Run ``config`` on 2 Ray workers (ZeRO-2); rank 1 dies at step 6, the group restarts from
    the step-4 checkpoint and finishes step 8. Returns the run config and its metrics."""
    cfg = load_run_config(config, tiny_overrides(tmp_path, shards, *KILL, *extra))
    final = run(cfg)
    assert final["step"] == 8 and final["skipped_samples"] == 0
    assert (cfg.run_dir / ".injected_failure_step6").exists()
    records = metrics(cfg.run_dir)
    steps = [r["step"] for r in records]
    # steps 1..6 ran, a worker died after 6, the group resumed from step 4: 5 and 6 again
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8], steps
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["restarts"] == 1 and status["state"] == "finished"
    # the resumed steps repeat what the killed run logged (same weights, data and RNG)
    loss = next(k for k in records[0] if k.startswith("loss/"))
    assert [r[loss] for r in records[4:6]] == [r[loss] for r in records[6:8]]
    assert all(torch.isfinite(torch.tensor(r[loss])) for r in records)
    return cfg, records


def rank0_step(cfg: RunConfig, step: int) -> tuple[dict, dict[str, dict], torch.Tensor]:
    """What rank 0 computed logged step ``step`` from (the loss it logs is rank 0's): its batch
    (the ``step``-th of its stream: batch 1, no accumulation), every engine's weights it met
    (the checkpoint of step - 1, where the resumed group started) and the RNG state saved
    there (the draws of stochastic depth)."""
    data = make_train_loader(cfg.data, rank=0, world_size=cfg.scaling.num_workers, steps=step,
                             seed=cfg.seed, cache=TeacherCache(cfg.method.cache_dir))  # fmt: skip
    batch = list(data)[-1]
    folder = cfg.run_dir / step_name(step - 1)
    weights = {engine.name: torch.load(next(engine.rglob("*model_states.pt")),
                                       weights_only=False)["module"]
               for engine in folder.iterdir() if engine.is_dir()}  # fmt: skip
    rng = torch.load(folder / "rng_rank0.pt", weights_only=False)["torch"]
    return batch, weights, rng


def student_output(cfg: RunConfig, weights: dict, lq: torch.Tensor, rng) -> torch.Tensor:
    """The student's training-mode forward, with the weights and RNG state of the step."""
    student = build_student(cfg.method.student)
    student.load_state_dict(weights["student"])
    torch.set_rng_state(rng)
    with torch.no_grad():
        return student(lq).float()


def test_dtkd_distils_the_decoded_resshift_cache_on_two_workers_and_resumes_after_a_kill(
    ray_cluster, tiny_shards, tmp_path
):
    torch.manual_seed(0)
    unet = tmp_path / "unet.safetensors"
    save_file(UNetModelSwin(**method("dtkd_tiny")["teacher"]["unet"]).state_dict(), str(unet))
    cache_dir = cache(str(ROOT / "configs/cache_resshift_tiny.yaml"), "decode=true",
                      f"teacher.unet_checkpoint={unet}", f"shards=[{tiny_shards}]",
                      f"output={tmp_path / 'cache'}")  # fmt: skip
    cfg, records = train_killed_and_resumed(
        "dtkd_tiny", tmp_path, tiny_shards, "name=dtkd", f"method.cache_dir={cache_dir}",
        f"method.teacher.unet_checkpoint={unet}", "engine.preview_every=4",
    )  # fmt: skip
    run_dir = cfg.run_dir
    # lambda(i) = i / 8 at training step i (logged after it, as step i + 1): 0 at step 0; the
    # ramp's N is unset in dtkd_tiny, so it is engine.max_steps = 8
    assert [r["lambda"] for r in records] == [(r["step"] - 1) / 8 for r in records]
    # the loss logged at step 5, computed again from its batch, the step-4 weights and the
    # cached (decoded) teacher output: L1 + lambda(4) L_KD, lambda(4) = 4 / 8
    batch, weights, rng = rank0_step(cfg, 5)
    sr = student_output(cfg, weights, batch["lq"], rng)
    want = dtkd_loss(sr, batch["gt"], batch["cache"]["z0"][:, 0].float(), lam=0.5)
    assert_loss(records[4]["loss/student"], want, "DTKD loss logged at step 5")
    assert (run_dir / "previews" / "step_00000004.png").exists()
    student = load_sr(run_dir / "export" / "student_ema.safetensors")  # official SwinIR names
    assert student.arch == "SwinIR" and student.scale == 4


def test_mtkd_aggregator_then_student_from_the_cache_on_two_workers_resume_after_kills(
    ray_cluster, tiny_shards, tmp_path
):
    torch.manual_seed(0)
    files = []
    for name, net in (("edsr.pth", build_sr("edsr", scale=4, num_feat=8, num_block=1)),
                      ("rcan.pth", build_sr("rcan", "light", scale=4, n_feats=8, n_resgroups=1,
                                            n_resblocks=1, reduction=4))):  # fmt: skip
        torch.save(net.state_dict(), tmp_path / name)
        files.append(str(tmp_path / name))
    model_files = f"[{','.join(files)}]"
    common = [f"shards=[{tiny_shards}]", f"output={tmp_path / 'cache'}"]

    # stage 1: the teachers' outputs cached (one column each), the aggregator trained on them
    teachers_cache = cache("teacher.kind=regression", f"teacher.model_files={model_files}",
                           *common)  # fmt: skip
    agg_cfg, _ = train_killed_and_resumed(
        "mtkd_tiny_aggregator", tmp_path, tiny_shards, "name=agg",
        f"method.cache_dir={teachers_cache}", f"method.teachers.model_files={model_files}",
    )  # fmt: skip
    aggregator = agg_cfg.run_dir / "export" / "aggregator.safetensors"
    assert aggregator.exists()

    # stage 2: the frozen aggregated teacher cached, the student distilled from mt_hr
    teacher = {**method("mtkd_tiny")["teacher"], "model_files": files,
               "checkpoint": str(aggregator)}  # fmt: skip
    job_yaml = tmp_path / "cache_aggregated.yaml"
    job_yaml.write_text(yaml.safe_dump({"teacher": teacher}))
    aggregated_cache = cache(str(job_yaml), *common)
    assert aggregated_cache != teachers_cache
    cfg, records = train_killed_and_resumed(
        "mtkd_tiny", tmp_path, tiny_shards, "name=student", f"method.cache_dir={aggregated_cache}",
        f"method.teacher.model_files={model_files}", f"method.teacher.checkpoint={aggregator}",
    )  # fmt: skip
    # the loss logged at step 5 from its batch, the step-4 weights and the cached mt_hr: Eq. 4
    # with the configured weights (mtkd_tiny: the paper's alpha = 0.1 on the gt term, 1 on L_DWT)
    batch, weights, rng = rank0_step(cfg, 5)
    sr = student_output(cfg, weights, batch["lq"], rng)
    want = mtkd_loss(sr, batch["gt"], batch["cache"]["z0"][:, 0].float(),
                     cfg.method.task_weight, cfg.method.kd_weight)  # fmt: skip
    assert_loss(records[4]["loss/student"], want, "MTKD loss logged at step 5")
    student = load_sr(cfg.run_dir / "export" / "student.safetensors")  # BasicSR EDSR names
    assert student.arch == "EDSR" and student.scale == 4
