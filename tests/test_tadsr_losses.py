"""TAD-SR loss pieces: HSD (paper 002 Eq. 7-8), hinge losses (Eq. 11-12), the time-aware
discriminator (Eq. 9-10) on a tiny random ResShift UNet."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from distsr.diffusion import ResShiftDiffusion, ScheduleConfig
from distsr.losses.adversarial import d_hinge_loss, d_hinge_terms, g_adv_loss
from distsr.losses.hsd import (
    hsd_gradient,
    hsd_loss,
    hsd_noise,
    hsd_timestep_count,
    sample_hsd_timesteps,
)
from distsr.models import UNetModelSwin
from distsr.models.autoencoder import AutoencoderConfig
from distsr.models.discriminator import OFFICIAL_DISC_KWARGS, TimeAwareDiscriminator
from distsr.models.resshift import (
    OFFICIAL_LEVELS,
    ResShift,
    encoder_features,
    feature_channels,
    validate_levels,
)
from distsr.recipes.base import frozen
from distsr.teachers import ResShiftTeacher, TeacherConfig

FIX = Path(__file__).parent / "fixtures" / "resshift"
LEVELS = (1, 3, "mid")  # the tiny UNet has 4 input blocks: conv, res(16x16), down, res(8x8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyTeacher(nn.Module):
    """A non-linear, t-dependent x0 predictor standing in for the teacher UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, lq=None):
        return torch.tanh(self.conv(x)) * 1.5 + 0.1 * t.float().view(-1, 1, 1, 1) * x**2


def as_teacher(net: nn.Module, schedule: ScheduleConfig) -> ResShiftTeacher:
    """``net`` as the denoiser of a pixel-space ResShift teacher (what HSD calls)."""
    cfg = TeacherConfig(unet={}, autoencoder=AutoencoderConfig(kind="pixel"), schedule=schedule)
    return ResShiftTeacher(cfg, ResShift(cfg, unet=net))


def _tiny_unet() -> UNetModelSwin:
    torch.manual_seed(0)
    cfg = json.loads((FIX / "unet_small_config.json").read_text())
    return UNetModelSwin(**cfg).eval().requires_grad_(False)


# ---------------------------------------------------------------- HSD


def test_hsd_gradient_equals_eps_difference_form():
    """Paper Eq. 7 + appendix A1: eps_phi(z_t) = (z_t - F - eta (z_y - F)) / (sqrt(eta) kappa)
    and the HSD gradient is w (eps_phi(z_t'^stu) - eps_phi(z_t'^tch)) with the U-Net Jacobian
    omitted. Since z_t'^stu = (1 - eta) z0_stu + eta z_y + kappa sqrt(eta) eps, the stopped-
    Jacobian eps_phi has d eps / d z0_stu = c = (1 - eta) / (sqrt(eta) kappa) (diagonal), so
        L_eps(z0_stu) = sum_b w / (2 c_b) || eps_sg(z_t'^stu) - eps_phi(z_t'^tch) ||^2
    has autograd gradient w (eps_stu - eps_tch). It must equal hsd_loss's gradient g."""
    diffusion = ResShiftDiffusion(ScheduleConfig(steps=15))
    teacher = ToyTeacher()
    tch = as_teacher(teacher, ScheduleConfig(steps=15))
    gen = torch.Generator().manual_seed(0)
    B, C, H, W = 3, 3, 8, 8
    z0_stu = torch.randn(B, C, H, W, generator=gen).requires_grad_(True)
    z0_tch, z_y, noise = (torch.randn(B, C, H, W, generator=gen) for _ in range(3))
    t = torch.tensor([0, 1, 2])

    cond = {"z_y": z_y, "lq": z_y}
    loss, g = hsd_loss(z0_stu, z0_tch, tch, cond, t, noise, reduction="sum", return_grad=True)
    (grad_hsd,) = torch.autograd.grad(loss, z0_stu)
    assert teacher.conv.weight.grad is None

    eta = torch.tensor(diffusion.etas[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    kappa, w = diffusion.kappa, 1.0 / (C * H * W)

    def eps_phi(z_t, stop):
        x0 = diffusion.denoise(teacher, z_t, t)
        x0 = x0.detach() if stop else x0
        return (z_t - x0 - eta * (z_y - x0)) / (eta.sqrt() * kappa)

    z_t_stu = diffusion.q_sample(z0_stu, z_y, t, noise)
    with torch.no_grad():
        eps_tch = eps_phi(diffusion.q_sample(z0_tch, z_y, t, noise), stop=True)
    c = (1 - eta) / (eta.sqrt() * kappa)
    eps_stu = eps_phi(z_t_stu, stop=True)
    l_eps = (w / (2 * c) * (eps_stu - eps_tch) ** 2).sum()
    (grad_eps,) = torch.autograd.grad(l_eps, z0_stu)

    torch.testing.assert_close(grad_hsd, grad_eps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g, w * (eps_stu - eps_tch).detach(), rtol=1e-4, atol=1e-6)
    assert grad_hsd.abs().max() > 1e-3  # not a vacuous comparison
    # with the teacher Jacobian kept, the gradient differs: the toy teacher is not trivial
    eps_full = eps_phi(diffusion.q_sample(z0_stu, z_y, t, noise), stop=False)
    (grad_full,) = torch.autograd.grad((w / (2 * c) * (eps_full - eps_tch) ** 2).sum(), z0_stu)
    assert (grad_full - grad_eps).abs().max() > 1e-3


def test_hsd_loss_reduction_and_zero_at_teacher():
    teacher = as_teacher(ToyTeacher(), ScheduleConfig(steps=4, min_noise_level=0.2))
    gen = torch.Generator().manual_seed(3)
    z0_stu = torch.randn(2, 3, 4, 4, generator=gen).requires_grad_(True)
    z0_tch, z_y, noise = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    cond = {"z_y": z_y, "lq": z_y}
    loss, g = hsd_loss(z0_stu, z0_tch, teacher, cond, 0, noise, return_grad=True)
    loss.backward()
    torch.testing.assert_close(z0_stu.grad, g / 2)  # "mean": per-sample sums, batch mean
    none = hsd_loss(z0_stu, z0_tch, teacher, cond, 0, noise, reduction="none")
    assert none.shape == (2,)
    # student == teacher with the same noise: no gradient at all (paper: "no additional bias")
    same = z0_tch.clone().requires_grad_(True)
    _, g0 = hsd_loss(same, z0_tch, teacher, cond, 0, noise, return_grad=True)
    assert torch.equal(g0, torch.zeros_like(g0))
    with pytest.raises(ValueError, match="timesteps must lie"):
        hsd_loss(z0_stu, z0_tch, teacher, cond, 4, noise)
    with pytest.raises(ValueError, match="reduction"):
        hsd_loss(z0_stu, z0_tch, teacher, cond, 0, noise, reduction="avg")


def test_hsd_gradient_hand_checked():
    one = torch.ones(1, 2, 1, 2)
    # eta = 0.25, kappa = 2, w = 1: w2 = 0.75 / (0.5 * 2) = 0.75; bracket = 3 - 1 + 0.5 - 2 = 0.5
    g = hsd_gradient(3 * one, one, 0.5 * one, 2 * one, eta_t=0.25, kappa=2.0, w=1.0)
    torch.testing.assert_close(g, 0.375 * one)
    # default w = 1 / (C * S) = 1/4; per-sample eta [0.25, 1.0] (eta = 1 gives weight 0)
    g = hsd_gradient(
        3 * one.repeat(2, 1, 1, 1),
        one.repeat(2, 1, 1, 1),
        0 * one.repeat(2, 1, 1, 1),
        0 * one.repeat(2, 1, 1, 1),
        eta_t=torch.tensor([0.25, 1.0]),
        kappa=2.0,
    )
    torch.testing.assert_close(g[0], torch.full((2, 1, 2), 0.75 * 2 / 4))
    torch.testing.assert_close(g[1], torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="eta_t"):
        hsd_gradient(one, one, one, one, eta_t=0.0, kappa=2.0)
    with pytest.raises(ValueError, match="share one shape"):
        hsd_gradient(one, one[:, :1], one, one, eta_t=0.5, kappa=2.0)


def test_hsd_timesteps_and_noise():
    assert hsd_timestep_count(15) == 3 and hsd_timestep_count(4) == 1
    t = sample_hsd_timesteps(3000, 15, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and set(t.tolist()) == {0, 1, 2}  # paper [1, 3], 1-based
    assert set(sample_hsd_timesteps(50, 4).tolist()) == {0}
    a = sample_hsd_timesteps(8, 15, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_hsd_timesteps(8, 15, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="max_frac"):
        sample_hsd_timesteps(4, 15, max_frac=0.0)
    like = torch.empty(64, 3, 8, 8)
    gauss = hsd_noise(like, "gaussian", torch.Generator().manual_seed(0))
    unif = hsd_noise(like, "uniform", torch.Generator().manual_seed(0))
    assert abs(gauss.mean()) < 0.05 and abs(gauss.std() - 1) < 0.05
    assert unif.min() >= 0 and unif.max() < 1 and abs(unif.mean() - 0.5) < 0.02
    with pytest.raises(ValueError, match="kind"):
        hsd_noise(like, "laplace")


# ---------------------------------------------------------------- hinge losses


def test_hinge_losses_hand_checked():
    fake = [torch.tensor([[0.5, -2.0], [-0.5, 3.0]]), torch.tensor([[-1.0], [0.0]])]
    real = [torch.tensor([[2.0, 0.0], [0.5, -1.0]]), torch.tensor([[1.0], [-3.0]])]
    # fake: relu(1 + x) -> head0 [1.5, 0, 0.5, 4] mean 1.5, head1 [0, 1] mean 0.5 -> 2.0
    # real: relu(1 - x) -> head0 [0, 1, 0.5, 2] mean 0.875, head1 [0, 4] mean 2 -> 2.875
    loss_fake, loss_real = d_hinge_terms(fake, real)
    assert loss_fake.item() == pytest.approx(2.0) and loss_real.item() == pytest.approx(2.875)
    assert d_hinge_loss(fake, real).item() == pytest.approx(4.875)
    # official: one mean over the concatenated logits: fake [1.5,0,0 | 0.5,4,1] -> 7/6
    loss_fake_c, _ = d_hinge_terms(fake, real, heads="concat_mean")
    assert loss_fake_c.item() == pytest.approx(7 / 6)
    # generator: -(mean head0 + mean head1) = -(0.25 + -0.5) = 0.25
    assert g_adv_loss(fake).item() == pytest.approx(0.25)
    assert g_adv_loss(real, heads="concat_mean").item() == pytest.approx(0.5 / 6)
    # the paper's text: the mean of the heads' means = the sum / K (K = 2 heads)
    loss_fake_m, loss_real_m = d_hinge_terms(fake, real, heads="mean")
    assert loss_fake_m.item() == pytest.approx(1.0) and loss_real_m.item() == pytest.approx(1.4375)
    assert g_adv_loss(fake, heads="mean").item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match="'sum', 'mean' or 'concat_mean'"):
        g_adv_loss(fake, heads="max")
    logit = torch.tensor([[0.5, -2.0]], requires_grad=True)
    g_adv_loss([logit]).backward()
    torch.testing.assert_close(logit.grad, torch.full((1, 2), -0.5))
    with pytest.raises(ValueError, match="heads"):
        d_hinge_loss(fake, real[:1])
    with pytest.raises(ValueError, match="non-empty list"):
        g_adv_loss(fake[0])


# ---------------------------------------------------------------- discriminator


def test_time_modulation_hand_checked():
    disc = TimeAwareDiscriminator([4], time_embed_dim=4, hidden=4)
    feat = torch.arange(16, dtype=torch.float32).view(1, 4, 2, 2) ** 1.5
    # GroupNorm(gcd(32, 4) = 4 groups) normalises each channel over its 4 values
    mean = feat.mean(dim=(2, 3), keepdim=True)
    var = feat.var(dim=(2, 3), unbiased=False, keepdim=True)
    normed = (feat - mean) / torch.sqrt(var + 1e-5)
    # zero-initialised modulation: identity, F_hat = Norm(F), for any t
    for t in (0, 7):
        torch.testing.assert_close(disc.modulate([feat], torch.tensor([t]))[0], normed)
    # by hand: gamma_0 = SiLU(emb)[0] (= SiLU(cos t)), gamma/beta biases set per channel
    lin = disc.modulations[0].emb_layers[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 1.0
        lin.bias.copy_(torch.tensor([0.0, 0.5, -1.0, 0.0, 0.25, 0.0, 0.0, -2.0]))
    t = 3
    # sinusoidal embedding of width 4: [cos(t), cos(t/100), sin(t), sin(t/100)]
    silu = lambda x: x / (1 + math.exp(-x))  # noqa: E731
    gamma = torch.tensor([silu(math.cos(t)), 0.5, -1.0, 0.0]).view(1, 4, 1, 1)
    beta = torch.tensor([0.25, 0.0, 0.0, -2.0]).view(1, 4, 1, 1)
    f_hat = disc.modulate([feat], torch.tensor([t]))[0]
    torch.testing.assert_close(f_hat, normed * (1 + gamma) + beta)
    assert not torch.allclose(disc.modulate([feat], torch.tensor([0]))[0], f_hat)


def test_discriminator_shapes_time_and_spectral_norm():
    unet = _tiny_unet()
    chans = feature_channels(unet, LEVELS)
    assert chans == [32, 64, 64]
    gen = torch.Generator().manual_seed(0)
    x, lq = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    skips, middle, _ = unet.encode(x, torch.tensor([0, 0]), lq=lq)
    assert feature_channels(unet, [*range(4), "mid"]) == [s.shape[1] for s in skips] + [
        middle.shape[1]
    ]

    disc = TimeAwareDiscriminator(chans, time_embed_dim=32, hidden=16, logit_channels=2)
    with torch.no_grad():  # leave the zero init so time and features reach the logits
        for mod, head in zip(disc.modulations, disc.heads):
            nn.init.normal_(mod.emb_layers[1].weight, std=0.5)
            nn.init.normal_(head.conv.weight, std=0.05)
    outs = {}
    for t in (0, 3):
        tt = torch.full((2,), t)
        feats = encoder_features(unet, x, tt, lq, LEVELS)
        assert [f.shape[1:] for f in feats] == [(32, 16, 16), (64, 8, 8), (64, 8, 8)]
        outs[t] = disc(feats, tt)
        assert [o.shape for o in outs[t]] == [(2, 2 * 256), (2, 2 * 64), (2, 2 * 64)]
    assert all(not torch.allclose(a, b) for a, b in zip(outs[0], outs[3]))

    convs = [m for m in disc.heads.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3 * len(chans)
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        assert type(conv.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    conv = disc.heads[0].cls
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(100.0)
    for _ in range(50):  # power iteration runs on each access in train mode
        _ = conv.weight
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
    assert 0.99 < sigma < 1.05

    with pytest.raises(ValueError, match="4 input blocks"):
        feature_channels(
            unet, [*OFFICIAL_LEVELS, "mid"]
        )  # official (3, 6, 9, 11) do not fit the tiny UNet
    with pytest.raises(ValueError, match="distinct"):
        validate_levels(unet, (1, 1))
    with pytest.raises(ValueError, match="C_k"):
        disc([f[:, :8] for f in feats], 0)
    with pytest.raises(ValueError, match="feature_channels"):
        TimeAwareDiscriminator([])


def test_generator_and_discriminator_steps_route_gradients():
    """Generator step under frozen(disc): the student gets gradients through the frozen
    teacher encoder, the discriminator none; the discriminator step updates only it."""
    unet = _tiny_unet()
    diffusion = ResShiftDiffusion(ScheduleConfig(steps=4, min_noise_level=0.2))
    torch.manual_seed(2)
    student = nn.Conv2d(3, 3, 3, padding=1)
    disc = TimeAwareDiscriminator(feature_channels(unet, LEVELS), time_embed_dim=32, hidden=16)
    gen = torch.Generator().manual_seed(4)
    z_T, z_y, z0_gt, lq, noise = (torch.randn(2, 3, 16, 16, generator=gen) for _ in range(5))
    t = torch.tensor([1, 3])

    def logits(z0):
        z_t = diffusion.q_sample(z0, z_y, t, noise)
        feats = encoder_features(unet, diffusion.normalize_input(z_t, t), t, lq, LEVELS)
        return disc(feats, t)

    # at init (zero 3x3 convs) the logits do not depend on the features (eval: no power
    # iteration of the spectral norm between the two calls)
    disc.eval()
    with torch.no_grad():
        a, b = logits(z0_gt), logits(z_y)
    disc.train()
    assert all(torch.allclose(x, y) for x, y in zip(a, b))

    # discriminator step: fake from the detached student output, real under no_grad
    z0_stu = student(z_T)
    with torch.no_grad():
        real = logits(z0_gt)
    d_hinge_loss(logits(z0_stu.detach()), real).backward()
    assert student.weight.grad is None
    assert disc.heads[0].conv.weight.grad.abs().sum() > 0
    with torch.no_grad():  # one plain SGD step makes the heads feature-dependent
        for p in disc.parameters():
            p -= 0.1 * p.grad
    disc.zero_grad(set_to_none=True)

    # generator step: adversarial + HSD (teacher = the same frozen UNet as denoiser)
    z0_stu = student(z_T)
    with frozen(disc):
        loss = g_adv_loss(logits(z0_stu))
        tch = as_teacher(unet, ScheduleConfig(steps=4, min_noise_level=0.2))
        loss = loss + hsd_loss(z0_stu, z0_gt, tch, {"z_y": z_y, "lq": lq}, 0, noise)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # frozen() restored them
    assert all(p.grad is None for p in unet.parameters())
    assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()

    # the adversarial part alone reaches the student only through the teacher encoder
    student.zero_grad(set_to_none=True)
    with frozen(disc):
        g_adv_loss(logits(student(z_T))).backward()
    assert student.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the official discriminator

# widths of hs[3], hs[6], hs[9], hs[11] and the middle block of the released real-SR x4 UNet
# (model_channels 160, channel_mult [1, 2, 2, 4]): the official heads' widths
OFFICIAL_CHANNELS = [160, 320, 320, 640, 640]


def test_official_discriminator_layout_and_init():
    """OFFICIAL_DISC_KWARGS on those widths is the official ProjectedDiscriminator(c_dim=64,
    embed_dim=160): per head of width C a Linear(160, 2C) modulation with PyTorch's default
    init, GroupNorm(32, C), a zero-initialised 3x3 conv, a spectral-norm 1-D head of width C
    (k=1 block, residual k=9 block, GroupNorm(4)) and 64 logits per token; the official module
    holds 19 C^2 + 395 C + 64 parameters per head."""
    torch.manual_seed(0)
    disc = TimeAwareDiscriminator(OFFICIAL_CHANNELS, **OFFICIAL_DISC_KWARGS)
    sn = "parametrizations.weight.original"
    for k, c in enumerate(OFFICIAL_CHANNELS):
        mod, head = disc.modulations[k], disc.heads[k]
        assert {n: tuple(p.shape) for n, p in mod.named_parameters()} == {
            "norm.weight": (c,), "norm.bias": (c,),
            "emb_layers.1.weight": (2 * c, 160), "emb_layers.1.bias": (2 * c,),
        }  # fmt: skip
        assert {n: tuple(p.shape) for n, p in head.named_parameters()} == {
            "conv.weight": (c, c, 3, 3), "conv.bias": (c,),
            f"main.0.0.{sn}": (c, c, 1), "main.0.0.bias": (c,),
            "main.0.1.weight": (c,), "main.0.1.bias": (c,),
            f"main.1.fn.0.{sn}": (c, c, 9), "main.1.fn.0.bias": (c,),
            "main.1.fn.1.weight": (c,), "main.1.fn.1.bias": (c,),
            f"cls.{sn}": (64, c, 1), "cls.bias": (64,),
        }  # fmt: skip
        assert mod.norm.num_groups == 32
        assert head.main[0][1].num_groups == head.main[1].fn[1].num_groups == 4
        assert head.main[1].fn[0].padding_mode == "circular"
        assert not head.conv.weight.any() and not head.conv.bias.any()
        # default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not the zero init
        w, bound = mod.emb_layers[1].weight.abs().max().item(), 1 / math.sqrt(160)
        assert 0.9 * bound < w <= bound
    count = sum(p.numel() for p in disc.parameters())
    assert count == sum(19 * c * c + 395 * c + 64 for c in OFFICIAL_CHANNELS)

    # a 64x64 latent (256^2 crop): 64 logits per token of each head, official layout; at init
    # the zero 3x3 convs make the logits ignore both the features and t
    sizes = [32, 16, 8, 8, 8]
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, s, s, generator=gen) for c, s in zip(OFFICIAL_CHANNELS, sizes)]
    disc.eval()  # no power iteration between the two calls
    with torch.no_grad():
        a = disc(feats, 0)
        b = disc([3 * f + 1 for f in feats], 13)
    assert [tuple(x.shape) for x in a] == [(1, 64 * s * s) for s in sizes]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_presets_select_the_official_and_the_paper_training():
    """configs/tadsr_resshift.yaml trains as the official code (docs/tadsr_paper_vs_official.md);
    tadsr_resshift_paper.yaml changes exactly the points Eq. 11-12 and Algorithm 1 state."""
    from distsr.config import CONFIG_DIR, load_yaml, planning_without_files
    from distsr.runconfig import load_run_config

    with planning_without_files():  # the weights need not be here
        official, paper = (load_run_config(n) for n in ("tadsr_resshift", "tadsr_resshift_paper"))
    d, e = official.method.disc, official.engine
    assert d.kwargs == OFFICIAL_DISC_KWARGS and d.lr is None
    assert (d.heads, d.lr_schedule, d.include_last_t, d.reuse_prior_noise) == (
        "concat_mean", "constant", False, False,
    )  # fmt: skip
    assert official.method.noise == "uniform" and official.method.disc.levels == [3, 6, 9, 11]
    assert (e.grad_clip, e.precision, e.optimizer.lr, e.scheduler.warmup_steps) == (
        0, "fp32", 5e-5, 5000,
    )  # fmt: skip
    assert official.data.batch_size * official.scaling.num_workers == 8  # train.batch[0]
    p = paper.method
    assert (p.noise, p.disc.heads, p.disc.include_last_t, p.disc.reuse_prior_noise) == (
        "gaussian", "sum", True, True,
    )  # fmt: skip
    top = _flat(load_yaml(CONFIG_DIR / "tadsr_resshift.yaml"))
    mine = _flat(load_yaml(CONFIG_DIR / "tadsr_resshift_paper.yaml"))
    assert {k for k, v in mine.items() if top.get(k) != v} == {
        "name", "method.noise", "method.disc.heads", "method.disc.include_last_t",
        "method.disc.reuse_prior_noise",
    }  # fmt: skip
