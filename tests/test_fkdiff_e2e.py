"""FKdiff training on the real stack: the locked teacher and the split of the PHexKD loss over
three engines (unit), then the whole chain end to end (stage 1, stage 2, the teacher's Z_hat
cached by the Ray caching job, PHexKD on 2 Ray workers with ZeRO-2, a worker killed and the
group resumed, the exported FASRer_S upscaling through the predictor table)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distsr.config import from_dict, planning_without_files
from distsr.data.cache import TeacherCache
from distsr.data.config import DataConfig
from distsr.data.reader import make_train_loader
from distsr.launch import run
from distsr.recipes.fkdiff import PAIRS, PHexKDConfig, PHexKDRecipe
from distsr.registry import build_teacher
from distsr.runconfig import load_run_config, write_run_record
from distsr.teachers.fkdiff import PriorNets, Stage1Nets
from distsr.teachers.source import CachedTeacher, LiveTeacher
from tests.conftest import ROOT, load_job, tiny_overrides
from tests.kd_reference import assert_loss, l1
from tests.test_kd_e2e import cache, method, rank0_step, train_killed_and_resumed

# float32 sums taken in another order: |a - b| <= 64 ulp of the larger (2^-23 relative each)
RTOL = 64 * torch.finfo(torch.float32).eps


def random_teacher_files(tmp_path: Path, seed: int = 0) -> list[str]:
    """Random stage-1 and stage-2 exports of the tiny teacher; the overrides that name them."""
    with planning_without_files():  # the config's weight files are what this writes
        teacher = from_dict(PHexKDConfig, method("fkdiff_tiny")).teacher
    torch.manual_seed(seed)
    stage1 = tmp_path / "restorer.safetensors"
    prior = tmp_path / "prior.safetensors"
    save_file(Stage1Nets(teacher.net, teacher.cfe).state_dict(), str(stage1))
    save_file(PriorNets(teacher.cfe, teacher.prior).state_dict(), str(prior))
    return [f"restorer_checkpoint={stage1}", f"prior_checkpoint={prior}"]


def tiny_recipe(tmp_path: Path) -> PHexKDRecipe:
    files = dict(item.split("=", 1) for item in random_teacher_files(tmp_path))
    cfg = method("fkdiff_tiny")
    cfg["teacher"] |= files
    recipe = PHexKDRecipe(from_dict(PHexKDConfig, cfg), device=torch.device("cpu"))
    recipe.bind(recipe.trainable())  # plain modules: backward by hand
    return recipe


def test_locked_teacher_gets_no_gradient_and_the_engines_get_exactly_the_gradient_of_L(tmp_path):
    recipe = tiny_recipe(tmp_path)
    torch.manual_seed(1)
    batch = {"lq": torch.rand(3, 3, 8, 8), "gt": torch.rand(3, 3, 32, 32),
             "__key__": ["a", "b", "c"]}  # fmt: skip
    teacher = recipe.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engines = recipe.trainable()
    split, order = {}, []
    for update in recipe.training_step(batch, step=3):
        order.append(update.engine)
        update.loss.backward()
        for name, net in engines.items():  # only the update's own engine has gradients
            has = [p.grad is not None for p in net.parameters()]
            assert all(has) if name == update.engine else not any(has), (update.engine, name)
        split |= {(update.engine, k): p.grad.clone()
                  for k, p in engines[update.engine].named_parameters()}  # fmt: skip
        engines[update.engine].zero_grad(set_to_none=True)
    assert order == ["student", "student_l", "fdd"]

    # the locked teacher: no parameter requires or received a gradient, weights unchanged
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())

    # the same weights in one graph of L = sum of L_KD over the 3 pairs + L_pix
    lq, gt, tgt = recipe.inputs(batch, step=3)
    recipe.total_loss(lq, gt, tgt["z0_tch"]).backward()
    assert len(PAIRS) == 3 and len(recipe.fdd.blocks) == 3 * 4
    for (engine, key), grad in split.items():
        joint = dict(engines[engine].named_parameters())[key].grad
        torch.testing.assert_close(grad, joint, rtol=RTOL, atol=1e-9, msg=f"{engine}.{key}")
    assert not any(p.grad is not None for p in teacher.parameters())


def assert_total_is_recomputed(cfg, record: dict, step: int) -> None:
    """The whole L logged at ``step`` (rank 0's "total"), computed again from that step's batch,
    the networks' weights of the checkpoint before it and the cached Z_hat (Sec. 3.3):
    L = sum over (a, b) in PAIRS of [L_FDD^{a,b} + L1(sr_a, sr_b)] + sum_i L1(gt, sr_i)."""
    batch, weights, rng = rank0_step(cfg, step)
    recipe = PHexKDRecipe(cfg.method, device=torch.device("cpu"))
    for name, net in recipe.trainable().items():
        net.load_state_dict(weights[name])
    recipe.bind(recipe.trainable())
    torch.set_rng_state(rng)
    with torch.no_grad():
        out = recipe.forwards(batch["lq"], batch["cache"]["z_hat"][:, 0].float())
        l_fdd = recipe.fdd({i: feats for i, (_, feats) in out.items()})
    kd = sum(l_fdd[a, b].double() + l1(out[a][0].double() - out[b][0].double()) for a, b in PAIRS)
    want = kd + sum(l1(sr.double() - batch["gt"].double()) for sr, _ in out.values())
    assert_loss(record["total"], want, f"PHexKD L logged at step {step}")


def cached_equals_live(cache_dir: str, shards: Path, job: list[str]) -> None:
    """A batch of the joined stream (one batch of the job: no shuffle, the job's batch size):
    the cached Z_hat is the live teacher's from the same seeded noise, on one thread as the
    job's actors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [*job, f"shards=[{shards}]", "output=unused"]
        teacher_cfg = load_job("cache_teacher").load_config(args).teacher
        teacher = build_teacher(teacher_cfg, "cpu")
        cache = TeacherCache(cache_dir)
        data = DataConfig(shards=[str(shards)], batch_size=16, shuffle=0)
        loader = make_train_loader(data, rank=0, world_size=1, steps=1, seed=0, cache=cache)
        batch = next(iter(loader))
        live = LiveTeacher(teacher, seed=0, fresh_noise=False).targets(batch)["z0_tch"]
        cached = CachedTeacher(cache, teacher).targets(batch)["z0_tch"]
        assert cached.shape == (16, 4 * teacher_cfg.prior.prior_channels)
        assert torch.equal(live, cached)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_fkdiff_stages_cache_and_phexkd_on_two_workers_resume_after_a_kill(
    ray_cluster, tiny_shards, tmp_path
):
    in_process = ["scaling.ray=false", "scaling.num_workers=1", "engine.zero_stage=0",
                  "engine.max_steps=2", "engine.checkpoint.every_steps=2",
                  "engine.preview_every=0"]  # fmt: skip
    # stage 1 (restorer + CFE_D, L1), then stage 2 (CFE_R + denoiser) from its export
    run(load_run_config("fkdiff_pretrain_tiny", tiny_overrides(tmp_path, tiny_shards, *in_process)))
    stage1 = tmp_path / "fkdiff_pretrain_tiny" / "export" / "restorer_ema.safetensors"
    prior_cfg = tiny_overrides(tmp_path, tiny_shards, *in_process,
                               f"method.restorer_checkpoint={stage1}")  # fmt: skip
    final = run(load_run_config("fkdiff_prior_tiny", prior_cfg))
    assert final["step"] == 2 and torch.isfinite(torch.tensor(final["loss/prior"]))
    prior = tmp_path / "fkdiff_prior_tiny" / "export" / "prior_ema.safetensors"
    files = [f"restorer_checkpoint={stage1}", f"prior_checkpoint={prior}"]

    # the two exports make the teacher whose Z_hat the Ray job caches
    job = [str(ROOT / "configs/cache_fkdiff_tiny.yaml"), *[f"teacher.{f}" for f in files]]
    cache_dir = cache(*job, f"shards=[{tiny_shards}]", f"output={tmp_path / 'cache'}")
    assert Path(cache_dir).name.startswith("fkdiff-")
    cached_equals_live(cache_dir, tiny_shards, job)

    phexkd = ["name=phexkd", f"method.cache_dir={cache_dir}",
              *[f"method.teacher.{f}" for f in files]]  # fmt: skip
    cfg, records = train_killed_and_resumed("fkdiff_tiny", tmp_path, tiny_shards, *phexkd)
    run_dir = cfg.run_dir
    assert_total_is_recomputed(cfg, records[4], step=5)
    exported = {p.name for p in (run_dir / "export").iterdir()}
    assert {"student_ema.safetensors", "student_l.safetensors", "fdd.safetensors"} <= exported

    # FASRer_S upscales through the one family table, its Z_hat from the teacher's prior
    from distsr.inference.predictors import load_predictor

    write_run_record(load_run_config("fkdiff_tiny", tiny_overrides(tmp_path, tiny_shards, *phexkd)))
    predictor = load_predictor(run_dir, "ema", device="cpu")
    lq = torch.rand(2, 3, 12, 10)
    sr = predictor(lq)
    assert sr.shape == (2, 3, 48, 40) and sr.min() >= 0 and sr.max() <= 1
    assert torch.equal(sr, predictor(lq))  # the prior's noise is seeded
    from distsr.inference.tiling import upscale_tiled

    tiled = upscale_tiled(predictor, lq, 4, tile=8, overlap=2)  # tiles share the image's Z_hat
    assert tiled.shape == sr.shape and torch.isfinite(tiled).all()

    # ... and exports as FASRer + the prior parts that feed it (no official format to match)
    from distsr.upscale.cli import export_official

    out = export_official(run_dir, tmp_path / "fasrer_s.pth")
    state = torch.load(out, weights_only=True)
    assert set(state) == {"params", "prior"} and out.with_suffix(".yaml").is_file()
    assert state["params"].keys() == predictor.net.state_dict().keys()
