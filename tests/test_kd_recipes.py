"""DTKD and MTKD pieces on tiny models, in process: the linear ramp, the DCTSwin aggregator, the
teachers from SR model files (single, multi, aggregated, decoded to pixels), the cache job's
teacher kinds, and each recipe's training step lowering its loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from distsr.config import ConfigError, from_dict, planning_without_files
from distsr.data.cache import TeacherCache
from distsr.models.dctswin import DCTSwin, DCTSwinConfig, dct2, dct_matrix, idct2
from distsr.models.resshift_unet import UNetModelSwin
from distsr.models.sr import build_sr
from distsr.recipes.dtkd import DtkdConfig, DtkdRecipe
from distsr.recipes.kd import RampConfig, StudentConfig, linear_ramp
from distsr.recipes.mtkd import AggregatorConfig, AggregatorRecipe, MtkdConfig, MtkdRecipe
from distsr.registry import build_teacher
from distsr.runconfig import load_run_config
from distsr.teachers.cache_job import load_config, run_in_process
from distsr.teachers.pixels import PixelOutputs
from distsr.teachers.regression import MultiTeacher, RegressionTeacher
from distsr.teachers.source import LiveTeacher
from distsr.teachers.sr import (
    AggregatedTeacher,
    AggregatedTeacherConfig,
    RegressionTeachersConfig,
    build_regression_teachers,
    load_aggregator,
)
from tests.conftest import ROOT
from tests.kd_reference import assert_loss, dtkd_loss, l1, mtkd_dwt, mtkd_loss

CPU = torch.device("cpu")
TINY_AGG = DCTSwinConfig(channels=8, blocks=1, layers=2, window=8, heads=2)
TINY_STUDENT = StudentConfig("edsr", "baseline", kwargs={"num_feat": 8, "num_block": 2})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_net(net, path: Path) -> str:
    """A state_dict as safetensors, or as a torch pickle (``.pth``, as official releases)."""
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> list[str]:
    """Two tiny x4 teachers of different architectures (EDSR: ours, RCAN: spandrel's)."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    edsr = build_sr("edsr", scale=4, num_feat=8, num_block=1)
    rcan = build_sr("rcan", "light", scale=4, n_feats=8, n_resgroups=1, n_resblocks=1,
                    reduction=4)  # fmt: skip
    return [save_net(edsr, folder / "edsr.safetensors"), save_net(rcan, folder / "rcan.pth")]


@pytest.fixture(scope="module")
def batch() -> dict:
    """4 gt crops of 32x32 from a real photo, lq their x4 bicubic (antialiased) downscale."""
    from skimage import data

    img = torch.from_numpy(np.asarray(data.astronaut())).permute(2, 0, 1).float() / 255
    gt = torch.stack([img[:, 100 + 40 * i : 132 + 40 * i, 200:232] for i in range(4)])
    lq = F.interpolate(gt, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    return {"gt": gt, "lq": lq, "__key__": [f"k{i}" for i in range(4)]}


def train(recipe, name: str, batch: dict, steps: int, step: int = 0, lr: float = 2e-3):
    """Plain Adam steps on ``recipe.training_step(batch, step)`` (fixed step: fixed objective)."""
    net = recipe.trainable()[name]
    recipe.bind({name: net})
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        (update,) = list(recipe.training_step(batch, step))
        assert update.engine == name
        opt.zero_grad()
        update.loss.backward()
        opt.step()
        losses.append(update.loss.item())
    return losses


# ---------------------------------------------------------------- DTKD's ramp


def test_ramp_is_zero_at_step_zero_and_linear_up_to_its_end_step():
    cfg = RampConfig(lambda_max=0.8, end_step=10)
    assert linear_ramp(0, cfg) == 0.0
    # exactly lambda_max * i / N (one multiplication and one division: exactly rounded)
    assert [linear_ramp(i, cfg) for i in range(11)] == [0.8 * i / 10 for i in range(11)]
    assert linear_ramp(10, cfg) == linear_ramp(1000, cfg) == 0.8
    diffs = np.diff([linear_ramp(i, cfg) for i in range(11)])
    assert np.allclose(diffs, 0.08, rtol=0, atol=4 * np.finfo(float).eps)
    with pytest.raises(ConfigError, match="end_step"):
        from_dict(RampConfig, {"end_step": 0})


@pytest.mark.parametrize("name", ["dtkd_resshift_swinir", "dtkd_srmdnf", "dtkd_tiny"])
def test_the_ramp_ends_at_max_steps_unless_set(name):
    """A config that leaves N out ramps over the whole run, not to lambda_max at step 1."""
    with planning_without_files():
        cfg = load_run_config(name, ["engine.max_steps=37"])
        assert load_run_config(name, ["method.ramp.end_step=5"]).method.ramp.end_step == 5
    assert cfg.method.ramp.end_step == 37
    assert linear_ramp(1, cfg.method.ramp) == pytest.approx(1 / 37)


def test_the_dtkd_paper_preset_caches_resshifts_stochastic_sampler():
    with planning_without_files():
        assert load_run_config("dtkd_resshift_swinir").method.teacher.sampler == "stochastic"


# ---------------------------------------------------------------- the DCTSwin aggregator


def test_window_dct_is_the_orthonormal_dct_ii_and_idct_inverts_it():
    d = dct_matrix(8)
    x = torch.rand(3, 8, 8, 5, dtype=torch.float64)
    want = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(1, 2))
    # float64 sums of 64 products: within 64 ulps of the largest coefficient
    tol = 64 * np.finfo(np.float64).eps * np.abs(want).max()
    assert np.abs(dct2(x, d).numpy() - want).max() <= tol
    assert (idct2(dct2(x, d), d) - x).abs().max().item() <= 64 * np.finfo(np.float64).eps


def test_aggregator_maps_n_teacher_outputs_to_one_image_of_any_size():
    torch.manual_seed(0)
    net = DCTSwin(num_inputs=3, scale=4)  # the paper's C 24, 4 blocks x 2 layers, window 8
    assert (net.cfg.channels, net.cfg.blocks, net.cfg.layers, net.cfg.window) == (24, 4, 2, 8)
    assert len(net.blocks) == 4 and all(len(b.layers) == 2 for b in net.blocks)
    assert [layer.shift for layer in net.blocks[0].layers] == [0, 4]  # W-MSA, then SW-MSA
    out = net(torch.rand(2, 9, 36, 44))  # not a multiple of scale x window: padded, cropped
    assert out.shape == (2, 3, 36, 44)
    with pytest.raises(ValueError, match="9 channels"):
        net(torch.rand(1, 6, 32, 32))
    srs = torch.rand(1, 9, 32, 32)
    skip = DCTSwin(3, 4, DCTSwinConfig(mean_skip=True))
    skip.load_state_dict(net.state_dict())
    mean = srs.view(1, 3, 3, 32, 32).mean(1)
    assert torch.allclose(skip(srs) - net(srs), mean, atol=1e-6)


# ---------------------------------------------------------------- teachers from files


def test_teacher_files_make_one_teacher_or_a_multi_teacher_under_one_fingerprint(
    teacher_files, tmp_path, batch
):
    one = build_regression_teachers(RegressionTeachersConfig(model_files=teacher_files[:1]), CPU)
    assert isinstance(one, RegressionTeacher) and one.outputs == ("z0",)
    multi = build_regression_teachers(RegressionTeachersConfig(model_files=teacher_files), CPU)
    assert isinstance(multi, MultiTeacher) and multi.outputs == ("z0.edsr", "z0.rcan")
    out = multi.sample(multi.prepare(batch["lq"]))
    assert {k: tuple(v.shape) for k, v in out.items()} == {n: (4, 3, 32, 32) for n in multi.outputs}
    # the fingerprint covers every file: another weight in one of them changes it
    torch.manual_seed(1)
    other = save_net(build_sr("edsr", scale=4, num_feat=8, num_block=1), tmp_path / "o.pth")
    changed = build_regression_teachers(
        RegressionTeachersConfig(model_files=[other, teacher_files[1]]), CPU
    )
    assert changed.outputs == multi.outputs and changed.fingerprint() != multi.fingerprint()


def test_an_unknown_model_file_is_one_error_naming_what_was_tried(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match=r"mystery.*tried, in order: EDSR.*SwinIR"):
        build_regression_teachers(RegressionTeachersConfig(model_files=[str(path)]), CPU)
    torch.manual_seed(0)
    edsr = save_net(build_sr("edsr", scale=4, num_feat=8, num_block=1), tmp_path / "e.pth")
    cfg = from_dict(RegressionTeachersConfig, {"model_files": [edsr], "scale": 2})
    with pytest.raises(ValueError, match=r"x4 EDSR, expected x2"):
        build_teacher(cfg, CPU)  # the registry's builder for kind "regression"


def test_kd_configs_take_teachers_by_kind_with_every_problem_named(teacher_files):
    cfg = from_dict(DtkdConfig, {"teacher": {"kind": "regression", "model_files": teacher_files}})
    assert isinstance(cfg.teacher, RegressionTeachersConfig)
    assert from_dict(DtkdConfig, {"teacher": {"unet_checkpoint": teacher_files[0]}}).teacher.kind \
        == "resshift"  # no kind: the first (ResShift, the paper's teacher)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        from_dict(DtkdConfig, {"teacher": {"kind": "regression", "model_files": ["nope.pth"],
                                           "scale": 0}})  # fmt: skip
    assert {p for p, _ in err.value.problems} == {"teacher.model_files[0]", "teacher.scale"}
    with pytest.raises(ConfigError, match=r"teacher.kind: must be one of \['resshift', "):
        from_dict(DtkdConfig, {"teacher": {"kind": "ncnn"}})


def test_aggregated_teacher_is_the_aggregator_over_the_teachers_and_loads_strictly(
    teacher_files, tmp_path, batch
):
    torch.manual_seed(0)
    net = DCTSwin(2, 4, TINY_AGG)
    ckpt = save_net(net, tmp_path / "agg.safetensors")
    cfg = AggregatedTeacherConfig(model_files=teacher_files, checkpoint=ckpt, aggregator=TINY_AGG)
    teacher = build_teacher(cfg, CPU)
    assert isinstance(teacher, AggregatedTeacher) and teacher.outputs == ("z0",)
    cond = teacher.prepare(batch["lq"])
    srs = teacher.teachers.sample(cond)
    with torch.no_grad():  # as the teacher runs it (the same kernels)
        want = net(torch.cat([srs["z0.edsr"], srs["z0.rcan"]], dim=1))
    assert torch.equal(teacher.sample(cond), want)
    assert teacher.fingerprint() != teacher.teachers.fingerprint()
    three = AggregatedTeacherConfig(model_files=[*teacher_files, teacher_files[0]],
                                    checkpoint=ckpt, aggregator=TINY_AGG)  # fmt: skip
    with pytest.raises(ValueError, match=r"(?s)3 teachers.*conv_first.weight file \[8, 96"):
        load_aggregator(three)


# ---------------------------------------------------------------- decoded to pixels


@pytest.fixture(scope="module")
def resshift_teacher(tmp_path_factory):
    """The tiny pixel-space ResShift teacher of dtkd_tiny.yaml with random weights."""
    method = yaml.safe_load((ROOT / "configs/dtkd_tiny.yaml").read_text())["method"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet") / "unet.safetensors"
    save_net(UNetModelSwin(**method["teacher"]["unet"]), path)
    method["teacher"]["unet_checkpoint"] = str(path)
    return build_teacher(from_dict(DtkdConfig, method).teacher, CPU)


def test_pixel_outputs_is_the_decoded_sample_from_the_same_noise(resshift_teacher, batch):
    pixels = PixelOutputs(resshift_teacher)
    assert pixels.stored == resshift_teacher.stored == ("z_y",)
    cond = pixels.prepare(batch["lq"])
    noise = torch.randn(4, *pixels.noise_shape(cond))
    want = resshift_teacher.decode(resshift_teacher.sample(cond, noise))
    assert torch.equal(pixels.sample(cond, noise), want)
    assert torch.equal(pixels.encode_gt(batch["gt"]), batch["gt"])
    parts = pixels.fingerprint_parts()
    assert parts == {"kind": "pixels", "teacher": resshift_teacher.fingerprint_parts()}
    fields = LiveTeacher(pixels, fresh_noise=False).cache_fields(batch)
    assert fields["z0"].shape == (4, 1, 3, 32, 32) and fields["z0"].dtype == torch.float16


def test_cache_job_builds_teachers_by_kind_and_decodes_on_request(
    teacher_files, tiny_shards, resshift_teacher, tmp_path
):
    shard = sorted(tiny_shards.glob("*.tar"))[0]
    base = [f"shards=[{shard}]", f"output={tmp_path / 'cache'}", "batch_size=16"]
    files = f"teacher.model_files=[{','.join(teacher_files)}]"
    summary = run_in_process(load_config(["teacher.kind=regression", files, *base]))
    cache = TeacherCache(summary["cache_dir"])
    assert not summary["failed"] and cache.outputs == ("z0.edsr", "z0.rcan")
    assert cache.parts["kind"] == "multi" and set(cache.parts["teachers"]) == {"edsr", "rcan"}
    unet = resshift_teacher.cfg.unet_checkpoint
    cfg = load_config([str(ROOT / "configs/cache_resshift_tiny.yaml"), "decode=true",
                       f"teacher.unet_checkpoint={unet}", *base])  # fmt: skip
    summary = run_in_process(cfg)
    cache = TeacherCache(summary["cache_dir"])
    assert cache.parts["kind"] == "pixels" and cache.parts["teacher"]["kind"] == "resshift"
    assert cache.manifest()["shards"][shard.name]["shapes"]["z0"] == [1, 3, 32, 32]


# ---------------------------------------------------------------- training steps


def reference_step(recipe, batch: dict, step: int):
    """(the recipe's update at ``step``, the student's output and the teacher target it read);
    the student in eval mode, so that both forwards are the same (SwinIR's stochastic depth)."""
    recipe.student.eval()
    (update,) = list(recipe.training_step(batch, step))
    with torch.no_grad():
        sr = recipe.nets["student"](batch["lq"])
    recipe.student.train()
    return update, sr, recipe.source.targets(batch, step)["z0_tch"]


def test_dtkd_step_lowers_its_loss_and_weighs_the_kd_term_by_the_ramp(resshift_teacher, batch):
    tiny = {"embed_dim": 12, "depths": [2], "num_heads": [2]}
    cfg = DtkdConfig(student=StudentConfig("swinir", "small", kwargs=tiny),
                     ramp=RampConfig(1.0, end_step=10))  # fmt: skip
    torch.manual_seed(0)
    recipe = DtkdRecipe(cfg, device=CPU, teacher=PixelOutputs(resshift_teacher))
    recipe.source.fresh_noise = False  # the same teacher target every step
    recipe.bind({"student": recipe.student})
    first, sr, tch = reference_step(recipe, batch, 0)
    assert first.logs["lambda"] == 0.0
    assert_loss(first.loss, dtkd_loss(sr, batch["gt"], tch, lam=0.0), "DTKD loss at step 0")
    losses = train(recipe, "student", batch, steps=8, step=5)
    assert losses[-1] < 0.8 * losses[0], losses
    half, sr, tch = reference_step(recipe, batch, 5)
    assert half.logs["lambda"] == 0.5  # lambda(5) = 1.0 * 5 / 10
    assert_loss(half.loss, dtkd_loss(sr, batch["gt"], tch, lam=0.5), "DTKD loss at step 5")
    assert set(recipe.preview(batch)) == {"bicubic", "teacher", "student", "gt"}


def test_mtkd_aggregator_step_lowers_l1_to_gt(teacher_files, batch):
    cfg = AggregatorConfig(teachers=RegressionTeachersConfig(model_files=teacher_files),
                           aggregator=TINY_AGG)  # fmt: skip
    torch.manual_seed(0)
    recipe = AggregatorRecipe(cfg, device=CPU)
    assert recipe.aggregator.num_inputs == 2
    losses = train(recipe, "aggregator", batch, steps=10, lr=1e-3)
    assert losses[-1] < 0.85 * losses[0], losses
    assert set(recipe.preview(batch)) == {"bicubic", "edsr", "rcan", "aggregated", "gt"}


def test_mtkd_student_step_lowers_the_papers_eq4_loss(teacher_files, tmp_path, batch):
    torch.manual_seed(0)
    ckpt = save_net(DCTSwin(2, 4, TINY_AGG), tmp_path / "agg.safetensors")
    teacher = AggregatedTeacherConfig(model_files=teacher_files, checkpoint=ckpt,
                                      aggregator=TINY_AGG)  # fmt: skip
    recipe = MtkdRecipe(MtkdConfig(teacher=teacher, student=TINY_STUDENT), device=CPU)
    losses = train(recipe, "student", batch, steps=8, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    # the defaults are the paper's Eq. 4, written out here: 0.1 ||sr - gt||_1 + L_DWT(sr, mt_hr)
    update, sr, mt_hr = reference_step(recipe, batch, 0)
    want = 0.1 * l1(sr.double() - batch["gt"].double()) + mtkd_dwt(sr, mt_hr, levels=1)
    assert_loss(update.loss, want, "MTKD loss with the default weights (Eq. 4)")
    # other weights weigh their own terms
    recipe.cfg.task_weight, recipe.cfg.kd_weight = 1.0, 0.1
    update, sr, mt_hr = reference_step(recipe, batch, 0)
    assert_loss(update.loss, mtkd_loss(sr, batch["gt"], mt_hr, 1.0, 0.1), "MTKD loss, 1 / 0.1")


@pytest.mark.parametrize("name", ["mtkd_rcan_light", "mtkd_edsr_baseline", "mtkd_swinir_light",
                                  "mtkd_tiny"])  # fmt: skip
def test_mtkd_presets_weigh_the_gt_term_by_alpha(name):
    """Eq. 4: alpha = 0.1 on ||sr - gt||_1, 1 on L_DWT, in every shipped stage-2 preset."""
    with planning_without_files():
        method = load_run_config(name).method
    assert (method.task_weight, method.kd_weight) == (0.1, 1.0)
