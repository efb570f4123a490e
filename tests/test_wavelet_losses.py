"""Wavelet / Fourier KD losses (DTKD grouped, MTKD band-wise, DTCWT and FFT variants) against
values computed by hand on small tensors, and gradient flow."""

from __future__ import annotations

import pytest
import torch

from distsr.losses.wavelet import (
    BandwiseWaveletLoss,
    FFTAmplitudeLoss,
    GroupedWaveletLoss,
    WaveletBands,
    build_kd_loss,
)

# The Haar filters are 1/sqrt(2) rounded to float32; two levels multiply four of them, so a
# result is within a few ulps of the exact value: 8 ulps relative, and 1e-6 absolute for the
# bands that are exactly 0 by hand (pytorch-wavelets leaves ~1e-7 there).
RTOL, ATOL = 8 * torch.finfo(torch.float32).eps, 1e-6


def ramp() -> torch.Tensor:
    """[[1..4], [5..8], [9..12], [13..16]] as [1, 1, 4, 4].

    Haar on each 2x2 block [[a, b], [c, d]]: LL = (a+b+c+d)/2, the detail bands
    (a+b-c-d)/2 = -4, (a-b+c-d)/2 = -1, (a-b-c+d)/2 = 0 on every block; LL1 = [[7, 11],
    [23, 27]]; level 2 on LL1: LL2 = 68/2 = 34, details -16, -4, 0.
    """
    return torch.arange(1.0, 17.0).view(1, 1, 4, 4)


def checkerboard() -> torch.Tensor:
    """+1/-1 checkerboard: every 2x2 block [[1, -1], [-1, 1]] has HH1 = 4/2 = 2, the rest 0."""
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    return signs.repeat(2, 2).view(1, 1, 4, 4)


def close(value: torch.Tensor, expected: float):
    torch.testing.assert_close(value, torch.tensor(expected), rtol=RTOL, atol=ATOL)


def test_haar_bands_by_hand():
    bands = WaveletBands(levels=2)(ramp())
    assert list(bands) == ["LL2", "LH2", "HL2", "HH2", "LH1", "HL1", "HH1"]
    close(bands["LL2"].abs().mean(), 34.0)
    close(torch.stack([bands[n].abs().mean() for n in ("LH2", "HL2", "HH2")]).sum(), 20.0)
    close(torch.stack([bands[n].abs().mean() for n in ("LH1", "HL1", "HH1")]).sum(), 5.0)


def test_dtkd_grouped_loss_by_hand():
    zero = torch.zeros(1, 1, 4, 4)
    loss = GroupedWaveletLoss()  # levels 2, weights 1/2/1
    groups = loss.groups(ramp())
    close(groups["LF"], 34.0)  # |LL2|
    close(groups["MF"], 20.0 / 3)  # (16 + 4 + 0) / 3
    close(groups["HF"], 5.0 / 3)  # (4 + 1 + 0) / 3
    close(loss(ramp(), zero), 34.0 + 2 * 20.0 / 3 + 5.0 / 3)  # = 49
    close(loss(checkerboard(), zero), 2.0 / 3)  # only HH1 = 2: HF = 2/3
    close(GroupedWaveletLoss(weights=(1, 2, 3))(checkerboard(), zero), 2.0)
    # one level: LF = |LL1| = (7+11+23+27)/4 = 17, no MF, HF = 5/3
    close(GroupedWaveletLoss(levels=1)(ramp(), zero), 17.0 + 5.0 / 3)


def test_mtkd_bandwise_loss_by_hand():
    zero = torch.zeros(1, 1, 4, 4)
    close(BandwiseWaveletLoss(levels=1)(ramp(), zero), (17.0 + 4 + 1 + 0) / 4)
    close(BandwiseWaveletLoss(levels=2)(ramp(), zero), (34.0 + 16 + 4 + 0 + 4 + 1 + 0) / 7)
    close(BandwiseWaveletLoss(levels=2)(checkerboard(), zero), 2.0 / 7)


def test_three_levels_and_the_loss_of_a_difference():
    torch.manual_seed(0)
    sr, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    bands = WaveletBands(levels=3)(sr)
    assert len(bands) == 3 * 3 + 1 and bands["LL3"].shape == (2, 3, 2, 2)
    for name in ("grouped", "bandwise"):
        loss = build_kd_loss(name, levels=3)
        close(loss(sr, target), loss(sr - target, torch.zeros_like(sr)).item())
        assert loss(sr, sr).item() == 0.0


def test_fft_amplitude_by_hand():
    zero = torch.zeros(1, 1, 4, 4)
    # a constant 3: the orthonormal DC coefficient is 16 * 3 / 4 = 12, the other 11 of the
    # 4 x 3 rfft2 coefficients are 0, so the mean is 12 / 12 = 1
    close(FFTAmplitudeLoss()(torch.full((1, 1, 4, 4), 3.0), zero), 1.0)
    # amplitudes do not see a circular shift
    close(FFTAmplitudeLoss()(ramp(), torch.roll(ramp(), (1, 2), (2, 3))), 0.0)


def test_dtcwt_variant():
    torch.manual_seed(0)
    sr, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    bands = WaveletBands(levels=2, transform="dtcwt")(sr)
    assert len(bands) == 6 * 2 + 1 and bands["D1.0"].shape[-1] == 2  # real, imaginary
    loss = GroupedWaveletLoss(transform="dtcwt")
    assert loss(sr, sr).item() == 0.0 and loss(sr, target).item() > 0
    close(loss(sr, target), loss(sr - target, torch.zeros_like(sr)).item())


@pytest.mark.parametrize(
    "loss",
    [GroupedWaveletLoss(), BandwiseWaveletLoss(), GroupedWaveletLoss(transform="dtcwt"),
     BandwiseWaveletLoss(levels=3), FFTAmplitudeLoss()],
    ids=["grouped", "bandwise", "dtcwt", "bandwise3", "fft"],
)  # fmt: skip
def test_gradient_flows(loss):
    torch.manual_seed(0)
    sr = torch.rand(2, 3, 16, 16, requires_grad=True)
    target = torch.rand(2, 3, 16, 16)
    value = loss(sr.to(torch.bfloat16), target)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0


def test_bad_options():
    with pytest.raises(ValueError, match="levels"):
        WaveletBands(levels=0)
    with pytest.raises(ValueError, match="transform"):
        WaveletBands(transform="dct")
    with pytest.raises(ValueError, match="w_LF"):
        GroupedWaveletLoss(weights=(1, 2))
    with pytest.raises(ValueError, match="known"):
        build_kd_loss("l2")
