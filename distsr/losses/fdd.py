"""The Frequency Discriminative Distiller of FKdiff's PHexKD (paper 000, Sec. 3.3.2; METHODS.md §5).

For a pair of feature maps f_a, f_b from paired layers of networks a and b:

    frequency branch   X_f1 = Conv3x3(X);  X_f2 = W * F(X_f1);  X_fout = C(X_f2)
    spatial branch     X_S  = Conv1x1(X)
    L_amp = 2 / (U V) sum_{u < U/2} sum_v | |X_fout^a| - |X_fout^b| |
    L_ph  = 2 / (U V) sum_{u < U/2} sum_v | angle(X_fout^a) - angle(X_fout^b) |
    L_F   = eta L_amp + (1 - eta) L_ph;     L_S = L1(X_S^a, X_S^b)
    L_FDD = lam L_F + (1 - lam) L_S

F is the orthonormal 2-D DFT (the paper's 1 / sqrt(HW)). A real map's spectrum is Hermitian, so
only the rows u = 0 .. U/2 - 1 (all columns v) enter, as in the paper's sums: ``rfft2`` over
(W, H) keeps rows 0 .. U/2 of H, and row U/2 is dropped. The losses are means over batch,
channels and those U/2 x V frequencies (the paper's 2 / (UV) normalisation, per map).

Learnable parts: a 3x3 and a 1x1 conv per side (each maps its network's channels to a common
width, ``channels``, default min(c_a, c_b)); one frequency filter W (real, per channel, on a
``filter_size`` grid resized bilinearly to the half spectrum, so one FDD serves any map size;
1 at init) and one complex batch norm C (Trabelsi et al., whitening of (Re, Im) per channel),
both shared by the two sides so that they compare in one space. C normalises the two sides
together (one batch of both), so it cannot hide a scale difference between them.
The phase difference is taken as the paper writes it, not wrapped to (-pi, pi].

No trivial minimum. The paper trains everything on the one loss it minimises (Sec. 3.3.1-3.3.2:
the FDD "aims to minimize the differences"; Sec. 4.1: Adam on L), so the FDD's own parameters
descend L_FDD too. Unconstrained, they reach L_FDD ~ 0 whatever the features: convs -> 0 (L_S ->
0; the spectra sink under C's eps), a large common conv3 bias (the DC bin swamps C's statistics
and whitens every other bin to ~0), C's gain gamma -> 0 or its offset beta -> large (both sides
-> beta: equal amplitudes and phases), a sparse filter (L_amp is degree 1 in W per bin, C's
normalisation degree 2, so L_amp falls by mean(W) / rms(W)). The rule here: the FDD chooses
*what* it compares, never *how much* of it --
  * every conv has orthonormal rows (one per output channel, flattened over (c_in, k, k)):
    the stored weight V is used as Gram-Schmidt(V) (QR, R's diagonal > 0), so no projection can
    shrink, and on the narrower side (c = c_in) the 1x1 is a rotation that cannot drop a
    direction of the features; the 3x3 has no bias (its only effect is the DC bin above);
  * C only standardises (no affine): nothing but the loss follows it, so its gain would be the
    loss's own scale, which the paper does not learn;
  * W = R ** tanh(theta) lies in [1/R, R] (R = ``filter_range``, 2): it re-weights bands, by
    at most R^2 against each other, and cannot delete one; on features with nothing in common it
    can lower L_amp at most by 2R / (1 + R^2) (0.8; Polya-Szego on mean(W) / rms(W)).
On independent white features, then, L_S >= E|N(0, 2)| = 2 / sqrt(pi) for any parameters (each
output channel of X_S^a - X_S^b has variance |w_a|^2 + |w_b|^2 = 2), and L_ph, L_amp stay at
their independent-spectra values (up to W's bounded factor); only features that really agree
lower L_FDD. The paper's equations for X_f1 .. X_fout, X_S, L_F, L_S and L_FDD are unchanged.
Not adversarial ("discriminative" despite the name): the paper minimises one loss, and with a
projection per side a maximiser would anti-align the two sides, which measures no disagreement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _c(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


class ComplexBatchNorm(nn.Module):
    """Complex batch norm without affine: centre, then whiten (Re, Im) with the inverse square
    root of their 2x2 covariance per channel (no gamma, beta: see the module's docstring)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(2, channels))
        self.register_buffer("running_cov", torch.stack([torch.ones(channels), torch.ones(channels),
                                                         torch.zeros(channels)]))  # fmt: skip

    def _stats(self, re: torch.Tensor, im: torch.Tensor):
        dims = [0, 2, 3]
        mean = torch.stack([re.mean(dims), im.mean(dims)])
        rc, ic = re - mean[0, :, None, None], im - mean[1, :, None, None]
        cov = torch.stack([(rc * rc).mean(dims), (ic * ic).mean(dims), (rc * ic).mean(dims)])
        return mean, cov

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        re, im = x.real, x.imag
        if self.training:
            mean, cov = self._stats(re, im)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_cov.lerp_(cov.to(self.running_cov.dtype), self.momentum)
        else:
            mean, cov = self.running_mean, self.running_cov
        vrr, vii, vri = cov[0] + self.eps, cov[1] + self.eps, cov[2]
        s = torch.sqrt(vrr * vii - vri * vri)  # inverse square root of [[vrr, vri], [vri, vii]]
        t = torch.sqrt(vrr + vii + 2 * s)
        wrr, wii, wri = (vii + s) / (s * t), (vrr + s) / (s * t), -vri / (s * t)
        rc, ic = re - _c(mean[0]), im - _c(mean[1])
        return torch.complex(_c(wrr) * rc + _c(wri) * ic, _c(wri) * rc + _c(wii) * ic)


def half_spectrum(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal DFT of real (B, C, H, W) maps at u = 0 .. H/2 - 1, all v: (B, C, H/2, W)."""
    h = x.shape[-2]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.fft.rfft2(x, dim=(-1, -2), norm="ortho")[..., : h // 2, :]


def phase(x: torch.Tensor) -> torch.Tensor:
    """atan2(Im, Re), with 0 (and a zero gradient) at exactly 0 instead of atan2's NaN gradient."""
    re, im = x.real, x.imag
    zero = (re == 0) & (im == 0)
    return torch.where(zero, 0.0, torch.atan2(im, torch.where(zero, 1.0, re)))


def orthonormal_rows(v: torch.Tensor) -> torch.Tensor:
    """A conv weight (out, in, kh, kw) whose rows, flattened, are Gram-Schmidt of v's rows: the
    QR of v^T with R's diagonal made positive (an orthonormal v comes back as it is)."""
    dtype = torch.promote_types(v.dtype, torch.float32)  # QR has no half-precision kernels
    q, r = torch.linalg.qr(v.flatten(1).to(dtype).T)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)
    return q.T.reshape(v.shape).to(v.dtype)


class OrthoConv2d(nn.Conv2d):
    """A conv whose weight is used as ``orthonormal_rows(weight)`` (stride 1, no groups)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, orthonormal_rows(self.weight), self.bias, padding=self.padding)


class FDD(nn.Module):
    """``FDD(c_a, c_b)(f_a, f_b)`` -> {"amp", "phase", "freq", "spatial", "fdd"}."""

    def __init__(
        self,
        c_a: int,
        c_b: int,
        eta: float = 0.5,
        lam: float = 0.5,
        channels: int | None = None,
        filter_size: tuple[int, int] = (8, 8),
        filter_range: float = 2.0,
    ):
        super().__init__()
        c = channels or min(c_a, c_b)
        if c > min(c_a, c_b) or filter_range < 1:
            raise ValueError(f"FDD needs channels <= min(c_a, c_b) = {min(c_a, c_b)} (orthonormal "
                             f"rows) and filter_range >= 1, got {c}, {filter_range}")  # fmt: skip
        self.eta, self.lam, self.log_range = eta, lam, math.log(filter_range)
        self.conv3_a, self.conv3_b = (
            OrthoConv2d(c_a, c, 3, padding=1, bias=False),
            OrthoConv2d(c_b, c, 3, padding=1, bias=False),
        )
        self.conv1_a, self.conv1_b = OrthoConv2d(c_a, c, 1), OrthoConv2d(c_b, c, 1)
        self.filter_theta = nn.Parameter(torch.zeros(1, c, *filter_size))  # W = R ** tanh(theta)
        self.cbn = ComplexBatchNorm(c)

    def _filter(self, shape: torch.Size) -> torch.Tensor:
        w = torch.exp(self.log_range * torch.tanh(self.filter_theta))  # in [1/R, R]
        if tuple(w.shape[-2:]) == tuple(shape):
            return w
        return F.interpolate(w, size=tuple(shape), mode="bilinear", align_corners=True)

    def frequency(self, f_a: torch.Tensor, f_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X_fout of both sides (complex, (B, c, H/2, W)), normalised together."""
        if f_a.shape[-2:] != f_b.shape[-2:]:
            raise ValueError(f"paired features differ in size: {tuple(f_a.shape)} vs "
                             f"{tuple(f_b.shape)}")  # fmt: skip
        if f_a.shape[-2] < 2:
            raise ValueError("FDD needs maps at least 2 pixels high")
        spec = torch.cat([half_spectrum(self.conv3_a(f_a)), half_spectrum(self.conv3_b(f_b))])
        spec = self.cbn(spec * self._filter(spec.shape[-2:]))
        return spec.chunk(2, dim=0)

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> dict[str, torch.Tensor]:
        x_a, x_b = self.frequency(f_a, f_b)
        amp = (x_a.abs() - x_b.abs()).abs().mean()
        ph = (phase(x_a) - phase(x_b)).abs().mean()
        freq = self.eta * amp + (1 - self.eta) * ph
        spatial = F.l1_loss(self.conv1_a(f_a), self.conv1_b(f_b))
        fdd = self.lam * freq + (1 - self.lam) * spatial
        return {"amp": amp, "phase": ph, "freq": freq, "spatial": spatial, "fdd": fdd}
