"""Wavelet and Fourier distillation losses on pytorch-wavelets (METHODS.md §3-4).

* ``GroupedWaveletLoss`` (DTKD): a J-level transform of ``sr - target`` grouped by frequency,
  ``L_KD = w_LF * L1_LF + w_MF * L1_MF + w_HF * L1_HF`` with LF = {LL_J}, MF = the details of
  levels 2..J, HF = the details of level 1 (J = 2: LF {LL2}, MF {LH2, HL2, HH2}, HF {LH1, HL1,
  HH1}; default weights 1/2/1, the paper's best w_MF = 2 w_LF = 2 w_HF). For J = 1 MF is empty.
* ``BandwiseWaveletLoss`` (MTKD): ``L_DWT = 1/(3J+1) * sum_{j, band} ||DWT_{j,band}(sr) -
  DWT_{j,band}(target)||_1``, the mean of the per-band L1 over the 3J+1 sub-bands.
* Ablation variants: any number of levels, ``transform="dtcwt"`` (dual-tree complex wavelets:
  6 oriented complex bands per level instead of 3), and ``FFTAmplitudeLoss`` (L1 between the
  amplitude spectra).

Every ``||.||_1`` is the mean absolute value over the band's elements (``F.l1_loss``); a group's
L1 is the mean of its bands' L1. The transforms are linear, so they are applied once, to the
difference. The transforms run in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DWT_BANDS = ("LH", "HL", "HH")  # the order of pytorch_wavelets' yh[j][:, :, k]
TRANSFORMS = ("dwt", "dtcwt")


class WaveletBands(nn.Module):
    """x -> {band name: coefficients}: "LL{J}" and, per level j (1 = finest), "LH{j}", "HL{j}",
    "HH{j}" (DWT) or "D{j}.{k}" for the 6 orientations k (DTCWT, real and imaginary parts)."""

    def __init__(
        self,
        levels: int = 2,
        wave: str = "haar",
        mode: str = "zero",
        transform: str = "dwt",
        biort: str = "near_sym_a",
        qshift: str = "qshift_a",
    ):
        super().__init__()
        if levels < 1:
            raise ValueError(f"wavelet levels must be >= 1, got {levels}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        from pytorch_wavelets import DTCWTForward, DWTForward

        self.levels, self.transform = levels, transform
        if transform == "dwt":
            self.fwd = DWTForward(J=levels, wave=wave, mode=mode)
        else:
            self.fwd = DTCWTForward(J=levels, biort=biort, qshift=qshift)

    def band_names(self, level: int) -> list[str]:
        if self.transform == "dwt":
            return [f"{b}{level}" for b in DWT_BANDS]
        return [f"D{level}.{k}" for k in range(6)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low, highs = self.fwd(x.float())
        bands = {f"LL{self.levels}": low}
        for j in range(self.levels, 0, -1):  # coarse to fine
            for k, name in enumerate(self.band_names(j)):
                bands[name] = highs[j - 1][:, :, k]
        return bands


def _l1(band: torch.Tensor) -> torch.Tensor:
    return band.abs().mean()


class GroupedWaveletLoss(nn.Module):
    """DTKD's frequency-grouped wavelet loss (METHODS.md §3, ``L_KD``)."""

    def __init__(self, levels: int = 2, weights: Sequence[float] = (1.0, 2.0, 1.0), **bands):
        super().__init__()
        if len(weights) != 3:
            raise ValueError(f"weights are (w_LF, w_MF, w_HF), got {tuple(weights)}")
        self.bands = WaveletBands(levels, **bands)
        self.weights = tuple(float(w) for w in weights)

    def groups(self, diff: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"LF", "MF", "HF"}: the mean per-band L1 of each group of ``diff``'s sub-bands."""
        bands = self.bands(diff)
        levels = self.bands.levels
        names = {"LF": [f"LL{levels}"],
                 "MF": [n for j in range(2, levels + 1) for n in self.bands.band_names(j)],
                 "HF": self.bands.band_names(1)}  # fmt: skip
        return {g: torch.stack([_l1(bands[n]) for n in ns]).mean() for g, ns in names.items() if ns}

    def forward(self, sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        groups = self.groups(sr - target)
        w = dict(zip(("LF", "MF", "HF"), self.weights))
        return sum(w[g] * value for g, value in groups.items())


class BandwiseWaveletLoss(nn.Module):
    """MTKD's ``L_DWT``: the mean over all sub-bands of the per-band L1 (METHODS.md §4)."""

    def __init__(self, levels: int = 1, **bands):
        super().__init__()
        self.bands = WaveletBands(levels, **bands)

    def forward(self, sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([_l1(b) for b in self.bands(sr - target).values()]).mean()


class FFTAmplitudeLoss(nn.Module):
    """L1 between the amplitude spectra ``|rfft2|`` (orthonormal) of sr and target."""

    def forward(self, sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        amp = [torch.fft.rfft2(x.float(), norm="ortho").abs() for x in (sr, target)]
        return (amp[0] - amp[1]).abs().mean()


KD_LOSSES = {"grouped": GroupedWaveletLoss, "bandwise": BandwiseWaveletLoss,
             "fft": FFTAmplitudeLoss}  # fmt: skip


def build_kd_loss(name: str, **kwargs) -> nn.Module:
    """A frequency-domain KD loss by name: "grouped" (DTKD), "bandwise" (MTKD) or "fft";
    kwargs go to the class (levels, weights, transform, wave, mode)."""
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; known: {sorted(KD_LOSSES)}")
    return KD_LOSSES[name](**kwargs)
