"""SR teachers/students: conformance against the official SwinIR / BasicSR EDSR and RCAN
fixtures (tests/fixtures/sr, copied from conformance/sr), full-size key manifests and
parameter counts, architecture detection from a file, strict-loading errors, students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distsr.models.sr import build_sr, load_sr, load_sr_model
from distsr.models.sr import keymaps as km
from distsr.models.sr.loader import swin_shift_mask
from distsr.teachers.regression import regression_teacher

FIX = Path(__file__).parent / "fixtures" / "sr"
ATOL = 1e-5  # README: float32 reloads differ by <= 4e-7 (thread-count reduction order)


def config(name: str) -> dict:
    cfg = json.loads((FIX / f"{name}_config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def manifest(name: str) -> list[tuple[str, list[int]]]:
    rows = [line.split("\t") for line in (FIX / f"{name}_keys.txt").read_text().splitlines()]
    return [(row[0], json.loads(row[1])) for row in rows]


def keys_and_shapes(net) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in net.state_dict().items()]


def zeros_from(rows) -> dict[str, torch.Tensor]:
    """A state_dict of zeros with the manifest's keys and shapes (int64 position indices)."""
    return {k: torch.zeros(s, dtype=torch.int64 if k.endswith("position_index") else None)
            for k, s in rows}  # fmt: skip


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol


# ---- key maps -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["edsr_x4", "edsr_baseline_x4", "rcan_x4", "rcan_lightweight_x4"])
def test_keymaps_reproduce_the_fixture_files(name):
    pairs = [line.split("\t") for line in
             (FIX / f"{name}_basicsr_to_official_keymap.txt").read_text().splitlines()]  # fmt: skip
    rule = km.edsr_basicsr_to_official if name.startswith("edsr") else km.rcan_basicsr_to_official
    assert rule([a for a, _ in pairs]) == dict(pairs)
    if name.startswith("edsr"):  # and back, MeanShift convs dropped
        official = {b: torch.zeros(1) for _, b in pairs} | km.meanshift_state(255.0)
        back, rgb_range = km.edsr_official_to_basicsr(official)
        assert list(back) == [a for a, _ in pairs] and rgb_range == 255.0


# ---- SwinIR tiny1 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swinir_io():
    return load_file(FIX / "swinir_tiny1_io.safetensors")


@pytest.mark.parametrize("size", ["16", "13x18"])
def test_swinir_tiny1_direct_and_testscript_padding(swinir_io, size):
    x = swinir_io[f"x{size}"]
    direct = load_sr(FIX / "swinir_tiny1.safetensors", scale=4)
    script = load_sr_model(FIX / "swinir_tiny1.safetensors", pad="testscript")
    assert direct.arch == "SwinIR" and direct.scale == 4
    with torch.no_grad():
        assert_close(direct.net(x), swinir_io[f"y{size}_direct"])
        assert_close(script(x), swinir_io[f"y{size}_testscript"])
    from distsr.models.sr.spandrel_nets import testscript_pad

    assert torch.equal(testscript_pad(x, 4), swinir_io[f"x{size}_testscript_padded"])
    assert not torch.allclose(swinir_io[f"y{size}_direct"], swinir_io[f"y{size}_testscript"])


def test_swinir_tiny1_float64_and_intermediates(swinir_io):
    net = load_sr_model(FIX / "swinir_tiny1.safetensors")
    x = (swinir_io["x16"] - net.mean) * net.img_range  # README §1 step 2
    with torch.no_grad():
        first = net.conv_first(x)
        assert_close(first, swinir_io["x16_direct_conv_first"])
        feats = net.forward_features(first)
        assert_close(feats, swinir_io["x16_direct_forward_features"])
        assert_close(net.conv_after_body(feats), swinir_io["x16_direct_conv_after_body"])
        y64 = net.double()(swinir_io["x16"].double())
    assert_close(y64, swinir_io["y16_direct_f64"], atol=1e-10)


def test_swinir_wrappers_and_missing_buffers(tmp_path, swinir_io):
    sd = load_file(FIX / "swinir_tiny1.safetensors")
    ema = {k: v.clone() for k, v in sd.items()}
    garbage = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"params": garbage, "params_ema": ema}, tmp_path / "realsr.pth")  # EMA first
    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "cls.pth")
    bare = {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "position_index"))}
    assert len(bare) < len(sd)
    x = swinir_io["x13x18"]
    for source in (tmp_path / "realsr.pth", tmp_path / "cls.pth", bare):
        net = load_sr_model(source)
        with torch.no_grad():
            assert_close(net(x), swinir_io["y13x18_direct"])


def test_shift_mask_and_index_match_the_network():
    net = build_sr("swinir", depths=[2], num_heads=[2], embed_dim=8, window_size=4, img_size=16)
    block = net.layers[0].residual_group.blocks[1]
    assert torch.equal(swin_shift_mask(16, 4), block.attn_mask)


# ---- EDSR / RCAN tiny -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["edsr_tiny", "rcan_tiny"])
def test_basicsr_tiny_fixtures(name):
    io = load_file(FIX / f"{name}_io.safetensors")
    overrides = {"res_scale": config(name)["res_scale"]} if name == "edsr_tiny" else {}
    loaded = load_sr(FIX / f"{name}.safetensors", **overrides)
    assert loaded.arch == name.split("_")[0].upper() and loaded.scale == 4
    for size in ("16", "13x18"):
        x = io[f"x{size}"]
        before = x.clone()
        with torch.no_grad():
            assert_close(loaded.net(x), io[f"y{size}"])
        assert torch.equal(x, before)  # the input is left untouched (spandrel RCAN scales it)
    with torch.no_grad():
        y64 = loaded.net.double()(io["x16"].double())
    # RCAN holds BasicSR's "- mean" as the original MeanShift's float32 bias -255 * mean
    assert_close(y64, io["y16_f64"], atol=1e-10 if name == "edsr_tiny" else 1e-7)


@pytest.mark.parametrize("name", ["edsr_tiny", "rcan_tiny"])
def test_original_names_load_to_the_same_network(name):
    sd = load_file(FIX / f"{name}.safetensors")
    rule = km.edsr_basicsr_to_official if name == "edsr_tiny" else km.rcan_basicsr_to_official
    official = km.rename(sd, rule(sd)) | km.meanshift_state(255.0)
    overrides = {"res_scale": 0.1} if name == "edsr_tiny" else {}
    io = load_file(FIX / f"{name}_io.safetensors")
    net = load_sr_model(official, **overrides)
    with torch.no_grad():
        assert_close(net(io["x13x18"]), io["y13x18"])


# ---- full-size manifests and parameter counts ----------------------------------------------
SWINIR_PRESETS = {
    "lightweight_x4": ("light", {}),
    "small": ("small", {}),
    "small_alt_pixelshuffle": ("small", {"upsampler": "pixelshuffle"}),
    "classical_x4": ("classical", {}),
    "classical_x4_s48": ("classical", {"img_size": 48}),
    "realworld_M_x4": ("realworld_m", {}),
    "realworld_L_x4": ("realworld_l", {}),
}
BASICSR_PRESETS = {
    "edsr_x4": ("edsr", "large"),
    "edsr_baseline_x4": ("edsr", "baseline"),
    "rcan_x4": ("rcan", "full"),
    "rcan_lightweight_x4": ("rcan", "light"),
    "rcan_6g10b_x4": ("rcan", "light", {"n_resgroups": 6, "n_resblocks": 10}),
}
MEANSHIFT_PARAMS = 2 * (3 * 3 + 3)  # the original RCAN's sub_mean / add_mean 1x1 convs


def n_params(net) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("variant", list(SWINIR_PRESETS))
def test_swinir_presets_match_manifests_and_counts(variant):
    facts = json.loads((FIX / "swinir_param_counts.json").read_text())[variant]
    preset, extra = SWINIR_PRESETS[variant]
    net = build_sr("swinir", preset, **extra)
    for key, value in facts["kwargs"].items():
        assert net.hyperparameters[key] == value, key
    assert n_params(net) == facts["num_parameters"]
    assert len(net.state_dict()) == facts["num_state_dict_entries"]
    if facts.get("manifest"):
        assert keys_and_shapes(net) == manifest(facts["manifest"][: -len("_keys.txt")])


@pytest.mark.parametrize("variant", list(BASICSR_PRESETS))
def test_edsr_rcan_presets_match_manifests_and_counts(variant):
    facts = json.loads((FIX / "edsr_rcan_param_counts.json").read_text())[variant]
    arch, preset, *extra = BASICSR_PRESETS[variant]
    net = build_sr(arch, preset, **(extra[0] if extra else {}))
    if arch == "edsr":
        assert n_params(net) == facts["num_parameters"]
        expected = manifest(facts["manifest"][: -len("_keys.txt")]) if facts["manifest"] else None
        assert expected is None or keys_and_shapes(net) == expected
        return
    assert n_params(net) == facts["num_parameters"] + MEANSHIFT_PARAMS
    assert not any(p.requires_grad for p in net.sub_mean.parameters())
    if facts["manifest"]:
        rows = manifest(facts["manifest"][: -len("_keys.txt")])
        names = km.rcan_basicsr_to_official([k for k, _ in rows])
        body = [(k, s) for k, s in keys_and_shapes(net) if not k.startswith(("sub_", "add_"))]
        assert body == [(names[k], s) for k, s in rows]


@pytest.mark.parametrize(
    ("name", "arch", "scale"),
    [("swinir_lightweight_x4", "SwinIR", 4), ("edsr_baseline_x4", "EDSR", 4),
     ("rcan_lightweight_x4", "RCAN", 4)],
)  # fmt: skip
def test_full_size_files_are_detected(name, arch, scale):
    rows = manifest(name)
    loaded = load_sr(zeros_from(rows))
    assert (loaded.arch, loaded.scale) == (arch, scale)
    got = keys_and_shapes(loaded.net)
    if arch == "RCAN":  # BasicSR names were mapped onto the original ones
        names = km.rcan_basicsr_to_official([k for k, _ in rows])
        rows = [(names[k], s) for k, s in rows]
        got = [(k, s) for k, s in got if not k.startswith(("sub_", "add_"))]
    assert got == rows


# ---- errors ---------------------------------------------------------------------------------
def test_unknown_file_gets_one_error_naming_what_was_tried(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.w": torch.zeros(2), "decoder.w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no known SR architecture") as err:
        load_sr_model(path)
    for name in ("EDSR", "SRMD", "RCAN (BasicSR names)", "SwinIR", "ESRGAN", "Compact"):
        assert name in str(err.value)


def test_file_that_does_not_fit_names_missing_and_unexpected_keys():
    sd = load_file(FIX / "edsr_tiny.safetensors")
    sd["body.0.extra.weight"] = sd.pop("body.1.conv2.bias")
    with pytest.raises(ValueError, match=r"missing keys.*body\.1\.conv2\.bias") as err:
        load_sr_model(sd)
    assert "unexpected keys" in str(err.value) and "body.0.extra.weight" in str(err.value)
    swin = load_file(FIX / "swinir_tiny1.safetensors")
    swin["layers.0.stray.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)SwinIR.*layers\.0\.stray\.weight"):
        load_sr_model(swin)


def test_scale_and_arch_checks():
    with pytest.raises(ValueError, match="x4 SwinIR, expected x2"):
        load_sr_model(FIX / "swinir_tiny1.safetensors", scale=2)
    with pytest.raises(ValueError, match="unknown SR architecture"):
        load_sr_model(FIX / "swinir_tiny1.safetensors", arch="NoSuchNet")
    with pytest.raises(ValueError, match="does not fit"):
        load_sr_model(FIX / "swinir_tiny1.safetensors", arch="EDSR")


# ---- students -------------------------------------------------------------------------------
TINY_STUDENTS = {
    "swinir": {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4,
               "img_size": 16},
    "edsr": {"num_feat": 8, "num_block": 1},
    "rcan": {"n_feats": 8, "n_resgroups": 1, "n_resblocks": 1, "reduction": 4},
    "srmd": {"nc": 8, "nb": 3},
    "rrdbnet": {"num_filters": 8, "num_blocks": 1},
    "srvgg": {"num_feat": 8, "num_conv": 2},
}  # fmt: skip


@pytest.mark.parametrize("arch", list(TINY_STUDENTS))
def test_students_train_and_their_exports_load_back(arch):
    torch.manual_seed(0)
    net = build_sr(arch, scale=2, **TINY_STUDENTS[arch]).train()
    lq = torch.rand(2, 3, 12, 12)
    sr = net(lq)
    assert sr.shape == (2, 3, 24, 24)
    sr.square().mean().backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    loaded = load_sr({"params": net.state_dict()})
    assert loaded.scale == 2
    with torch.no_grad():
        assert_close(loaded.net(lq), net.eval()(lq), atol=1e-6)


def test_srmd_degradation_map_is_an_input():
    net = build_sr("srmd", "srmd", scale=2, nc=8, nb=3).eval()
    lq = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        zero = net(lq)
        net.set_degradation(torch.linspace(0, 1, 16))
        assert not torch.allclose(net(lq), zero)
        assert torch.equal(net(lq), net(lq, torch.linspace(0, 1, 16)[None]))


def test_regression_teacher_from_a_file():
    teacher = regression_teacher(FIX / "rcan_tiny.safetensors", scale=4)
    io = load_file(FIX / "rcan_tiny_io.safetensors")
    sr = teacher.sample(teacher.prepare(io["x16"]))
    assert_close(sr, io["y16"])
    assert teacher.arch == "RCAN" and teacher.scale == 4 and not teacher.net.training
    assert teacher.fingerprint() == regression_teacher(FIX / "rcan_tiny.safetensors").fingerprint()


def test_other_spandrel_architectures_load_from_a_file(tmp_path):
    from spandrel.architectures.HAT import HAT

    torch.manual_seed(0)
    hat = HAT(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
              upsampler="pixelshuffle", compress_ratio=3, squeeze_factor=3).eval()  # fmt: skip
    torch.save({"params_ema": hat.state_dict()}, tmp_path / "hat.pth")
    teacher = regression_teacher(tmp_path / "hat.pth", scale=2)
    lq = torch.rand(1, 3, 16, 16)
    assert teacher.arch == "HAT"
    with torch.no_grad():
        assert_close(teacher.sample(teacher.prepare(lq)), hat(lq), atol=1e-6)
