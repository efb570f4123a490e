"""TAD-SR's ``training_step`` itself (paper 002 Algorithm 1), with a diffusion teacher defined only
here: a different latent shape (4 channels at half resolution), a DDPM-like forward process and
its own number of steps. The recipe reaches it only through ``Teacher``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distsr.fingerprint import hash_modules
from distsr.recipes.tadsr import DiscriminatorConfig, TadsrConfig, TadsrRecipe
from distsr.teachers.base import Teacher

T_TOY = 6


class ToyDenoiser(nn.Module):
    """x0_hat = net(z_t, t, lq): two convs with a time embedding; ``encode`` gives features."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(4 + 3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 24, 3, padding=1, stride=2)
        self.out = nn.Conv2d(16 + 24, 4, 3, padding=1)
        self.time = nn.Embedding(T_TOY, 16)

    def encode(self, z_t, t, lq):
        h = F.silu(self.inp(torch.cat([z_t, lq], 1)) + self.time(t)[..., None, None])
        return [h, F.silu(self.mid(h))]

    def forward(self, z_t, t, lq):
        h, m = self.encode(z_t, t, lq)
        return self.out(torch.cat([h, F.interpolate(m, size=h.shape[-2:])], 1))


class ToyLatentTeacher(Teacher):
    """z = 4-channel latent at half the gt size; z_t = a_t z0 + s_t eps (DDPM-like, a_t^2 +
    s_t^2 = 1); the condition is the lq resized to the latent size."""

    kind = "toy"
    stored = ("lq_lat",)

    def __init__(self):
        super().__init__()
        self.net = ToyDenoiser()
        self.register_buffer("a", torch.linspace(0.99, 0.3, T_TOY))
        self.calls: list[tuple[str, torch.Tensor, ...]] = []
        self.freeze()

    @property
    def num_timesteps(self):
        return T_TOY

    def prepare(self, lq, stored=None):
        lq_lat = F.interpolate(lq.float() * 2 - 1, scale_factor=2, mode="bilinear")
        return {"lq_lat": lq_lat if stored is None else stored["lq_lat"].float()}

    def noise_shape(self, cond):
        return (4, *cond["lq_lat"].shape[-2:])

    def _coef(self, t, like):
        t = torch.as_tensor(t, device=like.device).long().expand(like.shape[0])
        a = self.a[t].view(-1, 1, 1, 1)
        return t, a, (1 - a**2).sqrt()

    def prior(self, cond, noise):
        return noise.to(cond["lq_lat"].device).float()

    def noised(self, z0, t, cond, noise):
        self.calls.append(("noised", torch.as_tensor(t).clone(), noise.clone()))
        _, a, s = self._coef(t, z0)
        return a * z0 + s * noise

    def denoise(self, z_t, t, cond):
        t, _, _ = self._coef(t, z_t)
        return self.net(z_t, t, cond["lq_lat"])

    @torch.no_grad()
    def sample(self, cond, noise):
        z = self.prior(cond, noise)
        self.calls.append(("sample_z_T", z.clone()))
        for t in reversed(range(T_TOY)):  # DDIM-like, deterministic
            x0 = self.denoise(z, t, cond)
            if t == 0:
                return x0
            _, a, s = self._coef(t, z)
            _, a_prev, s_prev = self._coef(t - 1, z)
            z = a_prev * x0 + s_prev * (z - a * x0) / s
        return z

    def sqrt_snr(self, t, like):
        _, a, s = self._coef(t, like)
        return a / s

    def features(self, z_t, t, cond, levels):
        t, _, _ = self._coef(t, z_t)
        feats = self.net.encode(z_t, t, cond["lq_lat"])
        return [feats[-1] if lv == "mid" else feats[lv] for lv in levels]

    def feature_channels(self, levels):
        return [24 if lv == "mid" else 16 for lv in levels]

    def make_student(self):
        return copy.deepcopy(self.net).requires_grad_(True).train()

    def student_step(self, net, z_T, cond):
        self.calls.append(("student_z_T", z_T.clone()))
        t = torch.full((z_T.shape[0],), T_TOY - 1, dtype=torch.long, device=z_T.device)
        return net(z_T, t, cond["lq_lat"])

    def encode_gt(self, gt):
        return F.avg_pool2d(gt.float() * 2 - 1, 2).repeat(1, 2, 1, 1)[:, :4]

    def decode(self, z0):
        return ((F.interpolate(z0[:, :3], scale_factor=2) + 1) / 2).clamp(0, 1)

    def fingerprint_parts(self):
        return {"kind": self.kind, "weights": hash_modules([("net", self.net)])}


def make_recipe(teacher=None, **cfg):
    cfg = TadsrConfig(disc=DiscriminatorConfig(levels=[0], include_middle=True,
                                               kwargs={"hidden": 8, "time_embed_dim": 16}),
                      fresh_noise=False, **cfg)  # fmt: skip
    recipe = TadsrRecipe(cfg, device=torch.device("cpu"), teacher=teacher or ToyLatentTeacher())
    recipe.bind(recipe.trainable())  # plain modules stand in for the engines
    return recipe


def batch(n: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    keys = [f"k{seed}_{i}" for i in range(n)]
    lq, gt = torch.rand(n, 3, 8, 8, generator=gen), torch.rand(n, 3, 32, 32, generator=gen)
    return {"__key__": keys, "lq": lq, "gt": gt}


def run_steps(recipe, steps: int) -> list[dict]:
    """The engine's contract with plain optimizers: each update is applied before the next."""
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-3) for n, m in recipe.trainable().items()}
    logs = []
    for step in range(steps):
        for update in recipe.training_step(batch(seed=step), step):
            opts[update.engine].zero_grad()
            update.loss.backward()
            opts[update.engine].step()
            logs.append({"engine": update.engine, "loss": update.loss.item(), **update.logs})
    return logs


def test_tadsr_trains_with_a_teacher_defined_only_in_the_test():
    torch.manual_seed(0)
    recipe = make_recipe()
    before = copy.deepcopy(recipe.student.state_dict())
    logs = run_steps(recipe, 3)
    assert [entry["engine"] for entry in logs] == ["disc", "student"] * 3
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    after = recipe.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    preview = recipe.preview(batch())
    assert {v.shape for v in preview.values()} == {(2, 3, 32, 32)}


def test_student_and_teacher_start_from_the_same_z_T():
    teacher = ToyLatentTeacher()
    recipe = make_recipe(teacher)
    step = recipe.training_step(batch(), 0)
    next(step)
    starts = {name: z for name, z, *_ in teacher.calls if name.endswith("z_T")}
    assert torch.equal(starts["sample_z_T"], starts["student_z_T"])


def test_discriminator_sees_real_and_fake_at_the_same_t_and_eps_and_steps_first():
    teacher = ToyLatentTeacher()
    recipe = make_recipe(teacher)
    disc_opt = torch.optim.SGD(recipe.disc.parameters(), lr=1.0)
    step = recipe.training_step(batch(), 0)
    first = next(step)
    assert first.engine == "disc"  # Alg. 1: the discriminator is updated before the student
    fake, real = [c for c in teacher.calls if c[0] == "noised"][:2]
    assert torch.equal(fake[1], real[1]) and torch.equal(fake[2], real[2])
    first.loss.backward()
    disc_opt.step()
    disc_opt.zero_grad()
    updated = {k: v.detach().clone() for k, v in recipe.disc.named_parameters()}
    second = next(step)
    assert second.engine == "student"
    # the student's adversarial term used the updated discriminator, which gets no gradient
    second.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in recipe.disc.parameters())
    # (its weights stay; spectral norm's power-iteration buffers move in any train-mode forward)
    assert all(torch.equal(v, dict(recipe.disc.named_parameters())[k]) for k, v in updated.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.student.parameters())


def test_a_non_finite_student_step_guards_the_discriminator_update():
    """The engine applies an update only when its loss AND guards are finite on every rank
    (``Update.finite``): a NaN teacher target makes the student loss NaN, and the discriminator
    update of that micro-batch is skipped with it, so the discriminator stays as it was."""

    class NanTarget(ToyLatentTeacher):
        def sample(self, cond, noise):
            return super().sample(cond, noise) * float("nan")

    recipe = make_recipe(NanTarget())
    step = recipe.training_step(batch(), 0)
    disc_update = next(step)
    assert torch.isfinite(disc_update.loss) and not disc_update.finite()
    student_update = next(step)
    assert not student_update.finite()
    healthy = next(make_recipe().training_step(batch(), 0))
    assert healthy.finite()


def test_tadsr_refuses_a_teacher_without_features():
    from distsr.teachers import RegressionTeacher

    with pytest.raises(ValueError, match="encoder features"):
        make_recipe(RegressionTeacher(nn.Conv2d(3, 3, 1), scale=1))
