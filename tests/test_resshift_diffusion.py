"""ResShift diffusion math: schedule and official sampler conformance, hand-checked properties.

Fixtures (tests/fixtures/resshift/) come from the official zsyOAOA/ResShift code; see
conformance/resshift/README.md §2 and §4 for how they were made.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distsr.config import ConfigError, from_dict
from distsr.diffusion import REALSR_V1, REALSR_V3, ResShiftDiffusion, ScheduleConfig
from tests.ulps import assert_close_ulps, float32_rounding_margin

FIXTURES = Path(__file__).parent / "fixtures" / "resshift"
SCHEDULES = {
    "v1": ("realsr_v1_v2_15steps", REALSR_V1),
    "v3": ("realsr_v3_journal_4steps", REALSR_V3),
}


def _schedule_json(name: str) -> dict:
    return json.loads((FIXTURES / "schedule.json").read_text())[name]


def _sampler_io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "sampler_io.safetensors"))


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).float()


def _all_t(diffusion: ResShiftDiffusion) -> torch.Tensor:
    return torch.arange(diffusion.num_timesteps)


# ---- schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v3"])
def test_schedule_float64_matches_official(version):
    name, cfg = SCHEDULES[version]
    ref = _schedule_json(name)
    d = ResShiftDiffusion(cfg)
    assert d.num_timesteps == ref["num_timesteps"] == cfg.steps
    assert cfg.etas_start == pytest.approx(ref["hyperparameters"]["etas_start (= sqrt_etas[0])"])
    f64 = ref["float64"]
    pairs = {
        "sqrt_etas": d.sqrt_etas,
        "etas": d.etas,
        "etas_prev": d.etas_prev,
        "alpha (= etas - etas_prev)": d.alphas,
        "posterior_variance": d.posterior_variance,
        "posterior_variance_clipped": d.posterior_variance_clipped,
        "posterior_log_variance_clipped": d.posterior_log_variance_clipped,
        "posterior_mean_coef1 (multiplies x_t)": d.posterior_mean_coef1,
        "posterior_mean_coef2 (multiplies pred_x0)": d.posterior_mean_coef2,
        "kappa_sqrt_etas (q_sample noise std)": d.kappa_sqrt_etas,
    }
    for key, ours in pairs.items():
        assert ours.dtype == np.float64, key
        np.testing.assert_allclose(ours, f64[key], rtol=0, atol=1e-12, err_msg=key)
    assert d.sqrt_etas[-1] == pytest.approx(0.99, abs=1e-12)


# Every float32 value below is the float32 cast of a float64 schedule value, then only exactly
# rounded float32 ops (+, -, *, /), except three kernels that are not exactly rounded: torch.sqrt
# (input_std) and torch.exp (the step std) return, on a given CPU, one of the two float32 values
# around the true result (error < 1 ulp; the recorded run and this machine give a sqrt one ulp
# above the correctly rounded one, an AVX-512 machine gives the correctly rounded one): 1 ulp
# apart at most. 1 / input_std turns that into at most 2 ulps (a relative change of up to 2^-23
# of the divisor is up to 2 ulps of the quotient when the two sit in different binades).
SQRT_EXP_ULPS, RECIPROCAL_ULPS = 1, 2


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_schedule_float32_runtime_values_match_official(version):
    """The coefficients the official float32 run uses, read back through the public API."""
    name, cfg = SCHEDULES[version]
    f32 = _schedule_json(name)["float32_as_used_at_runtime"]
    d = ResShiftDiffusion(cfg)
    t = _all_t(d)
    B = len(t)
    zeros, ones = torch.zeros(B, 1, 1, 1), torch.ones(B, 1, 1, 1)
    flat = torch.Tensor.flatten
    # the float64 schedule goes through libm/NumPy pow, exp and log, which may differ by a
    # float64 ulp between CPUs; the values sit millions of float64 ulps from a float32 rounding
    # boundary, so their float32 casts (and the exactly rounded ops on them) are bit-exact
    for values in (d.etas, d.kappa_sqrt_etas, d.posterior_mean_coef1, d.posterior_mean_coef2,
                   d.posterior_log_variance_clipped):  # fmt: skip
        assert float32_rounding_margin(values[values != 0]) > 1e4

    # q_sample(z0=0, z_y=1, eps=0) = eta_t; q_sample(z0=0, z_y=0, eps=1) = kappa sqrt(eta_t)
    assert torch.equal(flat(d.q_sample(zeros, ones, t, zeros)), _f32(f32["etas"]))
    assert torch.equal(flat(d.q_sample(zeros, zeros, t, ones)), 2 * _f32(f32["sqrt_etas"]))
    mean1, _, logvar = d.posterior_mean_variance(ones, zeros, t)
    mean2, _, _ = d.posterior_mean_variance(zeros, ones, t)
    assert torch.equal(flat(mean1), _f32(f32["posterior_mean_coef1"]))
    assert torch.equal(flat(mean2), _f32(f32["posterior_mean_coef2"]))
    assert torch.equal(flat(logvar), _f32(f32["posterior_log_variance_clipped"]))
    prior = d.prior_sample(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert prior.item() == _f32(f32["prior_std = float32(kappa*sqrt_etas[T-1])"]).item()
    # through sqrt, 1 / sqrt and exp: within the bounds stated above
    key = "input_norm_std = sqrt(float32(etas)*kappa^2 + 1) [computed in float32]"
    assert_close_ulps(flat(d.input_std(t, zeros)), _f32(f32[key]), SQRT_EXP_ULPS, msg=key)
    key = "scale_input_of_ones = 1/input_norm_std (float32 division result)"
    assert_close_ulps(flat(d.normalize_input(ones, t)), _f32(f32[key]), RECIPROCAL_ULPS, msg=key)
    # p_sample at z_t = 0 with x0_hat = 0 and eps = 1 returns the step std (0 at t = 0)
    out = d.p_sample(lambda x, tt: torch.zeros_like(x), zeros, t, noise=ones)
    key = next(k for k in f32 if k.startswith("posterior_std"))
    std = _f32(f32[key])
    std[0] = 0.0
    assert_close_ulps(flat(out["sample"]), std, SQRT_EXP_ULPS, msg=key)


def test_schedule_config_validation():
    assert ScheduleConfig().validate() == []
    assert REALSR_V3.validate() == []
    bad = ScheduleConfig(steps=0, kappa=0.0, etas_end=1.5, power=-1.0)
    assert {k for k, _ in bad.validate()} == {"steps", "kappa", "etas_end", "power"}
    # a decreasing schedule is refused
    assert [k for k, _ in ScheduleConfig(min_noise_level=2.0, kappa=1.0).validate()] == [
        "min_noise_level"
    ]
    with pytest.raises(ValueError, match="kappa"):
        ResShiftDiffusion(ScheduleConfig(kappa=-2.0))
    with pytest.raises(ConfigError) as err:
        from_dict(ScheduleConfig, {"steps": 0, "kappa": -1.0, "kind": "linear"})
    paths = {p for p, _ in err.value.problems}
    assert {"steps", "kappa", "kind"} <= paths


def test_input_checks_raise_helpful_errors():
    d = ResShiftDiffusion(REALSR_V3)
    z = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="0..3"):
        d.q_sample(z, z, 4, z)
    with pytest.raises(ValueError, match="integer"):
        d.normalize_input(z, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        d.normalize_input(z, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise"):
        d.prior_sample(z, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="4 tensors"):
        d.sample_stochastic(lambda x, t: x, z, z, step_noises=[z, z])
    with pytest.raises(ValueError, match="denoise_fn returned"):
        d.denoise(lambda x, t: x[:, :1], z, 1)


# ---- forward process, prior, loss on hand-computed values ---------------------------------------
def test_q_sample_and_prior_hand_values():
    ref = _schedule_json("realsr_v3_journal_4steps")["float64"]
    d = ResShiftDiffusion(REALSR_V3)
    z0 = torch.full((2, 1, 2, 2), 1.0)
    z_y = torch.full((2, 1, 2, 2), 3.0)
    noise = torch.full((2, 1, 2, 2), 0.5)
    t = torch.tensor([0, 3])  # per-sample timesteps
    z_t = d.q_sample(z0, z_y, t, noise)
    for b, tb in enumerate(t.tolist()):
        eta, sqrt_eta = ref["etas"][tb], ref["sqrt_etas"][tb]
        expected = 1.0 + eta * (3.0 - 1.0) + 2.0 * sqrt_eta * 0.5  # z0 + eta (y - z0) + k s eps
        torch.testing.assert_close(z_t[b], torch.full_like(z_t[b], expected), atol=1e-6, rtol=0)
    # int t broadcasts to every sample
    assert torch.equal(
        d.q_sample(z0, z_y, 3, noise), d.q_sample(z0, z_y, torch.tensor([3, 3]), noise)
    )
    # prior: z_y + 1.98 eps, the forward process at T-1 started from z0 = z_y
    prior = d.prior_sample(z_y, noise)
    torch.testing.assert_close(prior, z_y + 1.98 * noise, atol=1e-6, rtol=0)
    assert torch.equal(prior, d.q_sample(z_y, z_y, 3, noise))


def test_training_loss_hand_values_and_gradient():
    ref = _schedule_json("realsr_v1_v2_15steps")["float64"]
    d = ResShiftDiffusion(REALSR_V1)
    z0 = torch.tensor([0.25, -0.5]).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    z_y = torch.tensor([1.0, 0.5]).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    noise = torch.tensor([-1.0, 2.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    t = torch.tensor([1, 14])
    w = torch.tensor(0.7, requires_grad=True)
    per_sample = d.training_loss(lambda x, tt: w * x, z0, z_y, t, noise, reduction="none")
    expected, dloss_dw = [], []
    for b, tb in enumerate(t.tolist()):
        eta, sqrt_eta = ref["etas"][tb], ref["sqrt_etas"][tb]
        a, y, e = z0[b, 0, 0, 0].item(), z_y[b, 0, 0, 0].item(), noise[b, 0, 0, 0].item()
        model_input = (a + eta * (y - a) + 2.0 * sqrt_eta * e) / math.sqrt(4.0 * eta + 1.0)
        expected.append((0.7 * model_input - a) ** 2)
        dloss_dw.append(2 * (0.7 * model_input - a) * model_input)
    torch.testing.assert_close(per_sample, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    loss = d.training_loss(lambda x, tt: w * x, z0, z_y, t, noise)
    torch.testing.assert_close(loss, torch.tensor(expected).mean(), atol=1e-6, rtol=1e-6)
    loss.backward()
    torch.testing.assert_close(w.grad, torch.tensor(dloss_dw).mean(), atol=1e-5, rtol=1e-5)


def test_p_sample_adds_no_noise_at_t0():
    d = ResShiftDiffusion(REALSR_V3)
    z_t = torch.randn(2, 3, 4, 4)
    big = torch.full_like(z_t, 1e3)
    out = d.p_sample(lambda x, t: torch.tanh(x), z_t, torch.tensor([0, 2]), noise=big)
    assert torch.equal(out["sample"][0], out["mean"][0])
    # at t = 0 the posterior mean is x0_hat itself (eta_prev = 0)
    assert torch.equal(out["mean"][0], out["pred_x0"][0])
    assert not torch.allclose(out["sample"][1], out["mean"][1])


# ---- stochastic sampler against the official loop -----------------------------------------------
# With the recorded x0 predictions in place of the network, every op of the loop is exactly
# rounded except each step's sqrt (input_std) and exp (step std), which may each differ by one
# ulp between CPUs (see SQRT_EXP_ULPS). Shifting every one of those 8 results by -1, 0 or +1
# ulp in turn (all 3^8 combinations) moves the model inputs, means, samples and z0 by at most
# 2 ulps of the tensor's largest value (elementwise, cancellation near zero makes it ~1000 ulps).
SAMPLER_ULPS = 2


def _check_against_official(denoise_fn, compare):
    io = _sampler_io()
    d = ResShiftDiffusion(REALSR_V3)
    z_y, noise_prior, step_noise = io["y_latent"], io["noise_prior"], io["step_noise"]
    compare(d.prior_sample(z_y, noise_prior), io["z_prior"], "z_prior")
    steps = list(d.sample_stochastic_progressive(denoise_fn, z_y, noise_prior, step_noise))
    assert [s["t"] for s in steps] == [3, 2, 1, 0]
    for s in steps:
        t = s["t"]
        for key in ("model_input", "pred_x0", "mean", "sample"):
            compare(s[key], io[f"step{t}.{key}"], f"step{t}.{key}")
    z0 = d.sample_stochastic(denoise_fn, z_y, noise_prior, step_noise)
    compare(z0, io["z0"], "z0")


def _within_ulps(actual, expected, msg):
    assert_close_ulps(actual, expected, SAMPLER_ULPS, scale="tensor", msg=msg)


def test_stochastic_sampler_matches_official_with_recorded_predictions():
    """(a) The network is replaced by the recorded official x0 predictions: the loop must match
    to the last bits (model input, mean and sample of every step, and z0; see SAMPLER_ULPS)."""
    io = _sampler_io()
    seen = []

    def recorded(model_input, t):
        step = int(t[0])
        assert torch.equal(t, io[f"step{step}.timesteps"])
        _within_ulps(model_input, io[f"step{step}.model_input"], f"step{step}.model_input")
        seen.append(step)
        return io[f"step{step}.pred_x0"].clone()

    _check_against_official(recorded, _within_ulps)
    assert seen == [3, 2, 1, 0] * 2


def test_stochastic_sampler_matches_official_with_small_unet():
    """(b) The real small UNet fixture in the loop (README §4: float32 noise floor ~5e-6;
    this implementation differs by <= 5.4e-6)."""
    from distsr.models.resshift_unet import UNetModelSwin

    config = json.loads((FIXTURES / "unet_small_config.json").read_text())
    unet = UNetModelSwin(**config)
    unet.load_state_dict(load_file(str(FIXTURES / "unet_small.safetensors")), strict=True)
    unet.eval()
    lq = _sampler_io()["lq"]
    with torch.no_grad():
        _check_against_official(
            lambda x, t: unet(x, t, lq=lq),
            lambda a, e, msg: torch.testing.assert_close(a, e, atol=5e-5, rtol=0, msg=msg),
        )


def test_stochastic_sampler_draws_noise_in_official_order():
    """Without given noises: the prior eps first, then one draw per step (t = 0 included)."""
    d = ResShiftDiffusion(REALSR_V3)
    z_y = torch.randn(2, 3, 4, 4)

    def fn(x, t):
        return 0.5 * x

    gen = torch.Generator().manual_seed(7)
    drawn = [torch.randn(z_y.shape, generator=gen) for _ in range(1 + d.num_timesteps)]
    explicit = d.sample_stochastic(fn, z_y, drawn[0], drawn[1:])
    implicit = d.sample_stochastic(fn, z_y, generator=torch.Generator().manual_seed(7))
    assert torch.equal(explicit, implicit)
    torch.manual_seed(7)
    drawn = [torch.randn_like(z_y) for _ in range(1 + d.num_timesteps)]
    torch.manual_seed(7)  # the global RNG, as the official loop uses it
    assert torch.equal(
        d.sample_stochastic(fn, z_y), d.sample_stochastic(fn, z_y, drawn[0], drawn[1:])
    )


# ---- deterministic (SinSR) sampler --------------------------------------------------------------
@pytest.mark.parametrize("cfg", [REALSR_V1, REALSR_V3], ids=["v1", "v3"])
def test_deterministic_sampler_returns_true_z0_exactly(cfg):
    d = ResShiftDiffusion(cfg)
    gen = torch.Generator().manual_seed(0)
    z0, z_y, eps = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3))
    oracle = lambda x, t: z0  # noqa: E731 - a perfect denoiser
    assert torch.equal(d.sample_deterministic(oracle, z_y, eps), z0)
    # started on the forward path, each step stays on it with the same eps:
    # z_{t-1} = q_sample(z0, z_y, t - 1, eps)
    z = d.q_sample(z0, z_y, d.num_timesteps - 1, eps)
    for t in range(d.num_timesteps - 1, 0, -1):
        z = d.deterministic_step(oracle, z, z_y, t)["sample"]
        torch.testing.assert_close(z, d.q_sample(z0, z_y, t - 1, eps), atol=2e-6, rtol=0)


def test_deterministic_one_step_returns_x0_hat():
    d = ResShiftDiffusion(ScheduleConfig(steps=1))
    assert d.sqrt_etas.tolist() == [0.99]  # the single step sits at the prior level
    z_y, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    calls = []

    def net(x, t):
        calls.append((x, t))
        return torch.sin(3 * x) + 0.1

    out = d.sample_deterministic(net, z_y, eps)
    ((x, t),) = calls
    assert t.tolist() == [0, 0]
    torch.testing.assert_close(
        x, (z_y + 1.98 * eps) / math.sqrt(4 * 0.99**2 + 1), atol=1e-6, rtol=0
    )
    assert torch.equal(out, torch.sin(3 * x) + 0.1)
    # the stochastic sampler agrees: its only step has no noise and mean = x0_hat
    assert torch.equal(d.sample_stochastic(net, z_y, eps), out)


def test_deterministic_step_coefficients_by_hand():
    ref = _schedule_json("realsr_v3_journal_4steps")["float64"]
    d = ResShiftDiffusion(REALSR_V3)
    gen = torch.Generator().manual_seed(1)
    z_t, z_y, x0_hat = (torch.randn(3, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in "abc")
    t = torch.tensor([2, 1, 0])  # per-sample timesteps
    out = d.deterministic_step(lambda x, tt: x0_hat, z_t, z_y, t)
    for b, tb in enumerate(t.tolist()):
        x0_b = x0_hat[b : b + 1]
        eta = ref["etas"][tb]
        eta_prev = ref["etas_prev"][tb]
        r = z_y[b] - x0_hat[b]
        expected = (
            x0_hat[b] + eta_prev * r + math.sqrt(eta_prev / eta) * (z_t[b] - x0_hat[b] - eta * r)
        )
        torch.testing.assert_close(out["sample"][b], expected, atol=1e-6, rtol=0)
        # the same step for that sample alone gives the same result
        alone = d.deterministic_step(
            lambda x, tt, x0_b=x0_b: x0_b, z_t[b : b + 1], z_y[b : b + 1], tb
        )
        assert torch.equal(alone["sample"][0], out["sample"][b])
    assert torch.equal(out["sample"][2], x0_hat[2])  # t = 0 returns x0_hat
