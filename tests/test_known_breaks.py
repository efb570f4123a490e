"""The EMA of trainable parameters only, and gradient clipping per engine (TAD-SR's discriminator
unclipped, as the official code), through real DeepSpeed engines over gloo in this process."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distsr.config import from_dict, planning_without_files
from distsr.engine.build import build_engine, engine_config, gathered
from distsr.engine.config import EngineConfig
from distsr.engine.context import init_in_process
from distsr.engine.deepspeed_config import deepspeed_config
from distsr.engine.ema import EMA
from distsr.engine.export import export_weights
from distsr.recipes.tadsr import TadsrRecipe
from distsr.runconfig import load_run_config
from tests.test_engine_units import _Scalar
from tests.ulps import assert_close_ulps

DECAY = 0.75
# lerp(a, b, 0.25) = a + 0.25 (b - a) against the float64 0.75 a + 0.25 b, rounded once to
# float32: the difference, the product and the sum are each rounded (<= 1.5 ulps of the
# tensor's largest value); 2 ulps at the tensor's scale.
EMA_ULPS = 2
# AdamW's bias corrections and sqrt are not exactly rounded: within 8 float32 ulps
ADAM_ULPS = 8


class _Partly(nn.Module):
    """A frozen layer, a trainable layer and a buffer (a student that trains a part of itself)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(x)) * self.scale


def _whole(engine) -> dict[str, torch.Tensor]:
    with gathered(engine):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 3])
def test_ema_keeps_trainable_parameters_only_and_exports_a_complete_state_dict(tmp_path, stage):
    """The shadow holds the trainable layer only; after one step it is the float64 EMA of the
    weights (independent of ``lerp_``); the EMA export is the module's complete state dict with
    the averages in place of the trainable weights and the frozen weights as they are.
    ZeRO-3: the weights are partitioned, so every read must gather them."""
    ctx = init_in_process()
    torch.manual_seed(0)
    module = _Partly()
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}
    cfg = from_dict(EngineConfig, {"zero_stage": stage, "optimizer": {"lr": 0.1}})
    engine = build_engine(copy.deepcopy(module), cfg, 1, ctx)
    ema = EMA(engine, DECAY)
    trainable = {"head.weight", "head.bias"}
    assert set(ema.shadow) == trainable
    assert sum(v.numel() for v in ema.shadow.values()) == 4 * 2 + 2  # of 4 * 3 + 4 + 10
    for name in trainable:
        assert torch.equal(ema.shadow[name], init[name]), name

    engine.backward(engine(torch.randn(5, 3)).square().mean())
    engine.step()
    ema.update(engine)
    weights = _whole(engine)
    for name in trainable:
        assert not torch.equal(weights[name], init[name]), name  # the step moved them
        expected = (DECAY * init[name].double() + (1 - DECAY) * weights[name].double()).float()
        assert_close_ulps(ema.shadow[name], expected, EMA_ULPS, scale="tensor", msg=name)

    written = export_weights(tmp_path, {"student": engine}, {"student": ema}, is_main=True)
    assert sorted(p.name for p in written) == ["student.safetensors", "student_ema.safetensors"]
    raw = load_file(tmp_path / "export" / "student.safetensors")
    avg = load_file(tmp_path / "export" / "student_ema.safetensors")
    assert set(avg) == set(raw) == set(init)  # complete: frozen layer and buffer included
    for name in init:
        if name in trainable:
            assert torch.equal(avg[name], ema.shadow[name]), name
        else:
            assert torch.equal(avg[name], init[name]) and torch.equal(raw[name], init[name]), name


def test_ema_loads_an_old_full_shadow_and_refuses_a_partial_one():
    """Checkpoints written before: their shadow has every parameter. The trainable entries are
    taken, the frozen ones dropped; a shadow without a trainable parameter is an error."""
    ctx = init_in_process()
    torch.manual_seed(1)
    engine = build_engine(_Partly(), from_dict(EngineConfig, {}), 1, ctx)
    ema = EMA(engine, 0.9)
    old = {
        n: torch.full_like(p, float(i)) for i, (n, p) in enumerate(engine.module.named_parameters())
    }
    ema.load_state_dict({"decay": 0.5, "shadow": old})
    assert ema.decay == 0.5 and set(ema.shadow) == {"head.weight", "head.bias"}
    for name, value in ema.shadow.items():
        assert torch.equal(value, old[name]), name
    with pytest.raises(ValueError, match=r"no average of 1 trainable parameters \(head\.bias\)"):
        ema.load_state_dict({"decay": 0.5, "shadow": {"head.weight": old["head.weight"]}})


def _tadsr_seesr(*overrides: str):
    with planning_without_files():  # the weights need not be here
        return load_run_config("tadsr_seesr", list(overrides))


def _overrides(run) -> dict:
    """TAD-SR's own ``optimizer_overrides`` (it reads only ``self.cfg``; building the recipe
    would load the SeeSR weights)."""
    return TadsrRecipe.optimizer_overrides(SimpleNamespace(cfg=run.method))


def test_tadsr_clips_the_student_only_in_the_deepspeed_config():
    """The official TAD-SeeSR clips the generator's parameters only: the student's DeepSpeed
    config has engine.grad_clip (1.0, max_grad_norm), the discriminator's 0.0 (off) unless
    method.disc.grad_clip sets one."""
    run = _tadsr_seesr()
    assert run.engine.grad_clip == 1.0 and run.method.disc.grad_clip is None
    over = _overrides(run)

    def clip(name, overrides):
        return deepspeed_config(engine_config(run.engine, overrides.get(name)), 1, 8)[
            "gradient_clipping"
        ]

    assert (clip("student", over), clip("disc", over)) == (1.0, 0.0)
    over = _overrides(_tadsr_seesr("method.disc.grad_clip=0.5"))
    assert (clip("student", over), clip("disc", over)) == (1.0, 0.5)
    assert engine_config(run.engine, {"grad_clip": None}).grad_clip is None
    assert run.engine.grad_clip == 1.0  # the shared config is left as it was
    with pytest.raises(ValueError, match="grad_clip: must be >= 0"):
        engine_config(run.engine, {"grad_clip": -1.0})


def test_real_engines_clip_the_student_and_not_the_discriminator():
    """Student and discriminator engines built as the trainer builds them (engine.grad_clip 1.0,
    the recipe's per-engine overrides), both receiving the gradient g = [3e4, 4e4] (norm 5e4):
    the student's AdamW sees g / 5e4, the discriminator's g itself. First AdamW step from w = 0
    (bias-corrected m = g, v = g^2): w = -lr g / (|g| + eps); eps = 10 makes it depend on |g|
    (-lr 0.6 / 10.6 clipped against -lr 3e4 / (3e4 + 10) unclipped)."""
    ctx = init_in_process()
    run = _tadsr_seesr()
    over = _overrides(run)
    cfg = from_dict(EngineConfig, {"grad_clip": 1.0, "optimizer": {"lr": 0.5, "eps": 10.0}})
    g = torch.tensor([30000.0, 40000.0])
    for name, seen in (("student", g / 50000.0), ("disc", g)):
        engine = build_engine(_Scalar(), cfg, 1, ctx, over.get(name))
        assert engine.gradient_clipping() == (1.0 if name == "student" else 0.0)
        lr = engine.get_lr()[0]
        engine.backward(engine(g))
        engine.step()
        s = seen.double()
        expected = (-lr * s / (s.abs() + 10.0)).float()
        assert_close_ulps(engine.module.w.detach(), expected, ADAM_ULPS, msg=name)
