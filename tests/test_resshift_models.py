"""Conformance of the ResShift teacher networks with the official code.

The fixtures in fixtures/resshift were produced by the official zsyOAOA/ResShift code: random
float16-representable weights, float32 reference outputs.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distsr.models import (
    RESSHIFT_REALSR_X4_KWARGS,
    UNetModelSwin,
    build_vq_f4,
    convert_official_vq,
    load_official_state_dict,
    vq_decode,
    vq_encode,
    vq_from_official,
)
from distsr.models.resshift_unet import timestep_embedding
from distsr.models.swin import resshift_shift_mask
from distsr.models.vq import VQ_F4_CONFIG

FIX = Path(__file__).parent / "fixtures" / "resshift"
TOL = 1e-4


def _small_config() -> dict:
    return json.loads((FIX / "unet_small_config.json").read_text())


def _read_keys(name: str) -> list[tuple[str, list[int], str]]:
    rows = []
    for line in (FIX / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            rows.append((key, json.loads(shape), dtype))
    return rows


@pytest.fixture(scope="module")
def small_unet() -> UNetModelSwin:
    model = UNetModelSwin(**_small_config()).eval()
    model.load_state_dict(load_file(FIX / "unet_small.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def unet_io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "unet_small_io.safetensors")


# ---------------------------------------------------------------- UNet numerics


@pytest.mark.parametrize("suffix", ["", "_32", "_rect"])  # native, larger square, non-square
def test_small_unet_reproduces_official_outputs(small_unet, unet_io, suffix):
    x, t, lq = unet_io[f"x{suffix}"], unet_io[f"timesteps{suffix}"], unet_io[f"lq{suffix}"]
    with torch.no_grad():
        out = small_unet(x, t, lq=lq)
    torch.testing.assert_close(out, unet_io[f"out{suffix}"], atol=TOL, rtol=0)


def test_small_unet_debug_taps(small_unet, unet_io):
    taps = {}
    names = [
        "input_blocks.0",
        "input_blocks.1",
        "input_blocks.3",
        "middle_block",
        "output_blocks.0",
    ]
    modules = dict(small_unet.named_modules())
    hooks = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: taps.update({n: o})) for n in names
    ]
    hooks.append(
        small_unet.time_embed.register_forward_hook(lambda m, a, o: taps.update(time_embed_out=o))
    )
    with torch.no_grad():
        small_unet(unet_io["x"], unet_io["timesteps"], lq=unet_io["lq"])
    for h in hooks:
        h.remove()
    emb = timestep_embedding(unet_io["timesteps"], small_unet.model_channels)
    torch.testing.assert_close(emb, unet_io["debug.timestep_embedding"], atol=1e-5, rtol=0)
    for name, value in taps.items():
        torch.testing.assert_close(value, unet_io[f"debug.{name}"], atol=TOL, rtol=0)


def test_stored_attn_mask_is_never_read(small_unet, unet_io):
    """The official block recomputes the mask every forward (README quirk 1)."""
    model = UNetModelSwin(**_small_config()).eval()
    state = load_file(FIX / "unet_small.safetensors")
    masks = [k for k in state if k.endswith("attn_mask")]
    assert len(masks) == 3
    for key in masks:  # our freshly built buffers equal the official ones ...
        torch.testing.assert_close(model.state_dict()[key], state[key], atol=0, rtol=0)
        state[key] = torch.full_like(state[key], 1e4)  # ... and garbage there changes nothing
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(unet_io["x"], unet_io["timesteps"], lq=unet_io["lq"])
    torch.testing.assert_close(out, unet_io["out"], atol=TOL, rtol=0)


def test_shift_mask_uses_the_non_standard_label_rule():
    ws, s = 4, 2
    mask = resshift_shift_mask(8, 8, ws, s)  # 2x2 windows of 16 tokens
    assert mask.shape == (4, 16, 16) and mask.dtype == torch.float32
    assert (mask[:2] == 0).all()  # only the last row of windows is masked
    # last-row window: token p = a*ws + b is labelled by its column b (b < ws - s vs b >= ws - s)
    assert mask[2, 0, 1] == 0 and mask[2, 0, 4] == 0  # b=0 vs b=1, b=0 vs (a=1, b=0)
    assert mask[2, 0, 2] == -100 and mask[3, 5, 7] == -100
    torch.testing.assert_close(mask[2], mask[3])  # never depends on the window column
    assert (resshift_shift_mask(8, 8, ws, 0) == 0).all()


def test_unet_rejects_bad_inputs(small_unet, unet_io):
    with pytest.raises(ValueError, match="multiple of the window size"):
        small_unet(torch.zeros(1, 3, 12, 12), torch.tensor([0]), lq=torch.zeros(1, 3, 12, 12))
    with pytest.raises(ValueError, match="lq="):
        small_unet(unet_io["x"], unet_io["timesteps"])
    with pytest.raises(ValueError, match="channel_mult"):
        UNetModelSwin(**{**_small_config(), "num_res_blocks": [1, 1, 1]})


# ---------------------------------------------------------------- UNet structure


def test_realsr_x4_unet_has_official_keys_shapes_dtypes():
    with torch.device("meta"):
        model = UNetModelSwin(**RESSHIFT_REALSR_X4_KWARGS)
    header = (FIX / "unet_keys_full.txt").read_text().splitlines()[1]
    assert json.loads(header.split(": ", 1)[1]) == RESSHIFT_REALSR_X4_KWARGS
    got = [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]
    assert got == _read_keys("unet_keys_full.txt")
    assert sum(p.numel() for p in model.parameters()) == 118_593_583


def test_lq_feature_extractor_branch():
    """lq_size = 4 * image_size: two conv/SiLU/stride-2 stages (16 -> 32 -> 64 channels)."""
    model = UNetModelSwin(**{**_small_config(), "lq_size": 64}).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if "feature_extractor" in k}
    assert shapes == {
        "feature_extractor.0.weight": [16, 3, 3, 3],
        "feature_extractor.0.bias": [16],
        "feature_extractor.2.op.weight": [32, 16, 3, 3],
        "feature_extractor.2.op.bias": [32],
        "feature_extractor.3.weight": [32, 32, 3, 3],
        "feature_extractor.3.bias": [32],
        "feature_extractor.5.op.weight": [64, 32, 3, 3],
        "feature_extractor.5.op.bias": [64],
    }
    assert model.input_blocks[0][0].weight.shape == (32, 3 + 64, 3, 3)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), torch.tensor([2]), lq=torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- VQ-f4


def _random_official_vq() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, _ in _read_keys("vq_f4_keys_full.txt"):
        w = torch.randn(shape, generator=gen)
        if key.endswith("embedding.weight"):
            state[key] = w
        elif len(shape) > 1:
            state[key] = w / torch.Size(shape[1:]).numel() ** 0.5  # N / sqrt(fan_in)
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * w
        else:
            state[key] = 0.05 * w
    return state


def _gn(x, sd, p):
    return F.silu(F.group_norm(x, 32, sd[p + "weight"], sd[p + "bias"], eps=1e-6))


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + "weight"], sd[p + "bias"], **kw)


def _resnet(x, sd, p):
    h = _conv(_gn(x, sd, p + "norm1."), sd, p + "conv1.", padding=1)
    h = _conv(_gn(h, sd, p + "norm2."), sd, p + "conv2.", padding=1)
    return (_conv(x, sd, p + "nin_shortcut.") if p + "nin_shortcut.weight" in sd else x) + h


def _mid(h, sd, p):
    """ldm mid block: resnet, single-head attention with 1x1-conv q/k/v/proj_out, resnet."""
    h = _resnet(h, sd, p + "mid.block_1.")
    a = p + "mid.attn_1."
    n = F.group_norm(h, 32, sd[a + "norm.weight"], sd[a + "norm.bias"], eps=1e-6)
    q, k, v = (_conv(n, sd, a + f"{c}.").flatten(2) for c in "qkv")  # [B, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k * q.shape[1] ** -0.5, dim=-1)
    h = h + _conv((v @ w.transpose(1, 2)).view_as(h), sd, a + "proj_out.")
    return _resnet(h, sd, p + "mid.block_2.")


def _ref_encode(x, sd):
    h = _conv(x, sd, "encoder.conv_in.", padding=1)
    for i in range(3):
        for j in range(2):
            h = _resnet(h, sd, f"encoder.down.{i}.block.{j}.")
        if i < 2:  # asymmetric zero pad, then stride-2 conv without padding
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv.", stride=2)
    h = _mid(h, sd, "encoder.")
    h = _conv(_gn(h, sd, "encoder.norm_out."), sd, "encoder.conv_out.", padding=1)
    return _conv(h, sd, "quant_conv.")


def _ref_decode(z, sd):
    h = _conv(_conv(z, sd, "post_quant_conv."), sd, "decoder.conv_in.", padding=1)
    h = _mid(h, sd, "decoder.")
    for i in reversed(range(3)):
        for j in range(3):
            h = _resnet(h, sd, f"decoder.up.{i}.block.{j}.")
        if i > 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv(h, sd, f"decoder.up.{i}.upsample.conv.", padding=1)
    return _conv(_gn(h, sd, "decoder.norm_out."), sd, "decoder.conv_out.", padding=1)


def _ref_quantize(z, codes):
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
    return codes[dist.argmin(1)].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def official_vq_state():
    return _random_official_vq()


def test_vq_config_matches_fixture():
    assert json.loads((FIX / "vq_f4_diffusers_config.json").read_text()) == VQ_F4_CONFIG


def test_vq_converted_weights_match_the_official_computation(official_vq_state):
    sd = official_vq_state
    vq = build_vq_f4().eval()
    vq.load_state_dict(convert_official_vq(sd), strict=True)
    assert sum(p.numel() for p in vq.parameters()) == 55_322_782
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vq_encode(vq, x)
        torch.testing.assert_close(z, _ref_encode(x, sd), atol=TOL, rtol=1e-4)
        dec_plain = vq.decode(z, force_not_quantize=True).sample
        torch.testing.assert_close(dec_plain, _ref_decode(z, sd), atol=TOL, rtol=1e-4)
        z_q = _ref_quantize(z, sd["quantize.embedding.weight"])
        torch.testing.assert_close(vq_decode(vq, z), _ref_decode(z_q, sd), atol=TOL, rtol=1e-4)
    assert z.shape == (1, 3, 8, 6)


def test_vq_from_official_file(tmp_path, official_vq_state):
    path = tmp_path / "autoencoder_vq_f4.pth"
    torch.save({"state_dict": official_vq_state}, path)
    vq = vq_from_official(path)
    key = "decoder.up_blocks.0.resnets.0.conv1.weight"  # official decoder.up.2 (reversed levels)
    assert torch.equal(vq.state_dict()[key], official_vq_state["decoder.up.2.block.0.conv1.weight"])
    assert not vq.training


# ---------------------------------------------------------------- checkpoint loading


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"params": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict+module", "params+orig_mod", "model+both"],
)
def test_load_official_unwraps_and_strips(tmp_path, small_unet, unet_io, wrap):
    path = tmp_path / "unet.pth"
    torch.save(wrap(small_unet.state_dict()), path)
    model = load_official_state_dict(path, UNetModelSwin(**_small_config()))
    with torch.no_grad():
        out = model.eval()(unet_io["x"], unet_io["timesteps"], lq=unet_io["lq"])
    torch.testing.assert_close(out, unet_io["out"], atol=TOL, rtol=0)


def test_from_official_reads_safetensors(tmp_path, unet_io):
    path = tmp_path / "unet.safetensors"
    save_file(load_file(FIX / "unet_small.safetensors"), path)
    model = UNetModelSwin.from_official(path, **_small_config())
    assert not model.training
    with torch.no_grad():
        out = model(unet_io["x_32"], unet_io["timesteps_32"], lq=unet_io["lq_32"])
    torch.testing.assert_close(out, unet_io["out_32"], atol=TOL, rtol=0)


def test_missing_file_names_path_and_model(tmp_path):
    path = tmp_path / "nowhere" / "resshift_realsrx4_s4_v3.pth"
    with pytest.raises(FileNotFoundError, match="resshift_realsrx4_s4_v3.pth") as err:
        UNetModelSwin.from_official(path, **_small_config())
    assert "UNetModelSwin" in str(err.value)


def test_other_architecture_lists_missing_and_unexpected_keys(tmp_path, official_vq_state):
    path = tmp_path / "vq.pth"
    small = {k: v for k, v in official_vq_state.items() if v.numel() < 100_000}
    torch.save(small, path)
    with pytest.raises(ValueError) as err:
        load_official_state_dict(path, UNetModelSwin(**_small_config()))
    msg = str(err.value)
    assert str(path) in msg and "missing keys (203)" in msg and "unexpected keys" in msg
    assert "time_embed.0.weight" in msg and "encoder.conv_in.bias" in msg and "more" in msg


def test_shape_mismatch_is_reported(tmp_path, small_unet):
    state = dict(small_unet.state_dict())
    state["out.2.weight"] = torch.zeros(3, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"shape mismatches \(1\): out.2.weight file \[3, 32, 1, 1\]"
    ):
        load_official_state_dict(path, UNetModelSwin(**_small_config()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_small_unet_on_cuda(small_unet, unet_io):
    model = UNetModelSwin(**_small_config()).cuda().eval()
    model.load_state_dict(small_unet.state_dict())
    inputs = [unet_io[k].cuda() for k in ("x_rect", "timesteps_rect", "lq_rect")]
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        out = model(inputs[0], inputs[1], lq=inputs[2])
    torch.testing.assert_close(out.cpu(), unet_io["out_rect"], atol=1e-3, rtol=0)
