"""The engines' precision rule (distsr/engine/precision.py) on real DeepSpeed engines: a bf16
engine takes and returns float32, gradients flow through a bf16 frozen ZeRO-3 engine, and
gradient accumulation equals the large-batch step of an independent torch AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distsr.config import from_dict
from distsr.engine.build import build_engine, build_frozen_engine
from distsr.engine.config import EngineConfig
from distsr.engine.context import init_in_process
from distsr.models.discriminator import TimeAwareDiscriminator
from tests.ulps import assert_close_ulps

# bf16 keeps 8 significant bits (unit roundoff u = 2^-8). A forward through these networks rounds
# the weights, the inputs and every layer's output (GroupNorm statistics, spectral norm's sigma
# from bf16 power-iteration vectors): at most ~32 roundoffs reach an output, so it stays within
# 32 u = 2^-3 of float32 relative to its scale. A lost cast or a float32 path through bf16 weights
# fails to run at all; wrong weights (e.g. not the ones trained) are off by O(1).
BF16_REL = 2.0**-3


def engine_cfg(**fields) -> EngineConfig:
    base = {"max_steps": 10, "grad_clip": 0.0, "optimizer": {"lr": 1e-2}}
    return from_dict(EngineConfig, {**base, **fields})


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_bf16_discriminator_engine_takes_and_returns_float32(zero_stage):
    """TAD-SR's crash (issue: addmv Float/BFloat16): spectral norm's power-iteration vectors are
    buffers, which DeepSpeed leaves in float32 beside bf16 weights."""
    torch.manual_seed(0)
    disc = TimeAwareDiscriminator([8, 16], time_embed_dim=16, hidden=8, logit_channels=2)
    reference = copy.deepcopy(disc)
    engine = build_engine(disc, engine_cfg(precision="bf16", zero_stage=zero_stage), 2,
                          init_in_process())  # fmt: skip
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in engine.module.buffers() if b.is_floating_point()} == {torch.bfloat16}
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    t = torch.tensor([3, 7])
    logits = engine(features, t)
    assert all(x.dtype == torch.float32 for x in logits)
    with torch.no_grad():
        expected = reference(features, t)
    for got, want in zip(logits, expected):
        assert rel_err(got.detach(), want) <= BF16_REL
    loss = sum(x.mean() for x in logits)
    engine.backward(loss)
    engine.step()
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    plain = engine.module(features, t)  # the generator step's frozen forward (Recipe.plain)
    assert all(x.dtype == torch.float32 for x in plain)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_reach_the_student_through_a_frozen_zero3_teacher(precision):
    """TAD-SR's HSD and adversarial terms reach the student through the frozen teacher: the
    student engine's backward passes through the teacher's ZeRO-3 engine (a bf16 teacher when
    the student trains in bf16, as the released tadsr_seesr)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    student = nn.Conv2d(3, 3, 3, padding=1)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ctx = init_in_process()
    # lr 0.1: the step moves each weight far more than bf16 rounds it
    cfg = engine_cfg(precision=precision, zero_stage=2, optimizer={"lr": 0.1, "eps": 1e-3})
    start = [p.detach().to(dtype).float() for p in student.parameters()]
    engine = build_engine(student, cfg, 2, ctx)
    frozen = build_frozen_engine(teacher.to(dtype).requires_grad_(False), 2, ctx)
    x = torch.randn(2, 3, 8, 8)
    y = frozen.module(engine(x))  # a teacher calls its partitioned module, as Recipe.partitioned
    assert y.dtype == torch.float32
    engine.backward((y**2).mean())
    engine.step()
    # independent: plain torch AdamW on the float32 pair
    opt = torch.optim.AdamW(ref_student.parameters(), lr=0.1, eps=1e-3, weight_decay=0.0)
    ref_start = [p.detach().clone() for p in ref_student.parameters()]
    (ref_teacher.requires_grad_(False)(ref_student(x)) ** 2).mean().backward()
    opt.step()
    params = zip(engine.module.parameters(), ref_student.parameters(), start, ref_start)
    for got, want, w0, ref_w0 in params:
        if precision == "fp32":  # the same sums in the same order: AdamW's sqrt within 8 ulps
            assert_close_ulps(got.detach(), want.detach(), 8, scale="tensor")
        else:  # the update itself, against float32's
            assert rel_err(got.detach().float() - w0, want.detach() - ref_w0) <= BF16_REL
    assert engine.get_global_grad_norm() > 0  # the gradient did reach the student


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.head(F.silu(self.conv(x)).flatten(1))


def large_batch_reference(net: nn.Module, xs, ys, cfg: EngineConfig) -> nn.Module:
    """Plain torch: AdamW steps on the mean loss of each whole batch (no DeepSpeed)."""
    net = copy.deepcopy(net)
    o = cfg.optimizer
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay)  # fmt: skip
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    return net


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_accum_matches_the_large_batch_step(precision, zero_stage):
    """grad_accum 2 x micro-batch 2 == batch 4: two optimizer steps, weights compared with an
    independent torch AdamW on the whole batches."""
    torch.manual_seed(0)
    net = _Net()
    xs, ys = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 5)
    # lr 0.1: two steps move each weight far more than bf16 rounds it
    # weight decay: bf16 at ZeRO-0 once decayed the masters before training (undo_warmup_step)
    cfg = engine_cfg(precision=precision, grad_accum=2, zero_stage=zero_stage,
                     optimizer={"lr": 0.1, "weight_decay": 0.5})  # fmt: skip
    expected = large_batch_reference(net, xs, ys, cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    start = [p.detach().to(dtype).float() for p in net.parameters()]
    engine = build_engine(copy.deepcopy(net), cfg, 2, init_in_process())
    for x, y in zip(xs, ys):
        for half in (slice(0, 2), slice(2, 4)):  # two micro-batches per optimizer step
            engine.backward(F.mse_loss(engine(x[half]), y[half]))
            engine.step()
    assert engine.global_steps == 2
    params = zip(engine.module.named_parameters(), expected.parameters(), net.parameters(), start)
    for (name, got), want, w0, w0_cast in params:
        got, want = got.detach().float(), want.detach()
        if precision == "fp32":
            # the accumulated gradient sums the same terms in another order (a few ulps of the
            # gradient); AdamW's early steps are ~lr * sign(g): 64 ulps at the tensor's scale
            assert_close_ulps(got, want, 64, scale="tensor", msg=name)
        else:  # the update of the bf16 weights (fp32 master copy inside), against float32's
            assert rel_err(got - w0_cast, want - w0.detach()) <= BF16_REL, name
