"""SeeSR UNet + ControlNet on diffusers: conformance with the official models (diffusers 0.21
code, cswry/SeeSR@8edecc7) through recorded weights, inputs and outputs, key manifests and
parameter counts (tests/fixtures/sr/seesr_*)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from distsr.models.seesr import (
    SD2_BASE_UNET_CONFIG,
    TADSR_SEESR_LEVELS,
    SeeSRControlNet,
    SeeSRUNet,
    controlnet_config,
    encoder_features,
    feature_channels,
    skip_channels,
)

FIX = Path(__file__).parent / "fixtures" / "sr"
CONFIG = json.loads((FIX / "seesr_tiny_config.json").read_text())
COUNTS = json.loads((FIX / "seesr_param_counts.json").read_text())
# The official float32 outputs used the explicit-softmax attention; diffusers 0.42 defaults to
# SDPA, which differs by <= 2e-6 here. 1e-4 is the acceptance bound. The float64 path is
# compared with the official float64 outputs within 1e-12 (observed: 3e-15).
ATOL32 = 1e-4
ATOL64 = 1e-12


def manifest(name: str) -> list[tuple[str, list[int]]]:
    rows = [line.split("\t") for line in (FIX / name).read_text().splitlines() if line]
    return [(r[0], json.loads(r[1])) for r in rows]


def layout(model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIX / "seesr_tiny_io.safetensors")


@pytest.fixture(scope="module")
def tiny() -> tuple[SeeSRUNet, SeeSRControlNet]:
    unet = SeeSRUNet(**CONFIG["unet"])
    unet.load_state_dict(load_file(FIX / "seesr_unet_tiny.safetensors"), strict=True)
    controlnet = SeeSRControlNet(**CONFIG["controlnet"])
    controlnet.load_state_dict(load_file(FIX / "seesr_controlnet_tiny.safetensors"), strict=True)
    return unet.eval(), controlnet.eval()


def run(unet, controlnet, io, dtype=torch.float32, with_controlnet=True):
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in io.items()}
    text, image = x["encoder_hidden_states"], x["image_encoder_hidden_states"]
    down, mid = controlnet(
        x["sample"], x["timestep"], text, x["controlnet_cond"], image_encoder_hidden_states=image
    )
    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    out = unet(
        x["sample"],
        x["timestep"],
        text,
        image_encoder_hidden_states=image,
        **(residuals if with_controlnet else {}),
    )
    return down, mid, out


# ---- numbers ----------------------------------------------------------------------------------
@torch.no_grad()
def test_tiny_models_reproduce_official_outputs(tiny, io):
    down, mid, out = run(*tiny, io)
    for i, d in enumerate(down):
        torch.testing.assert_close(d, io[f"controlnet_down_{i}"], atol=ATOL32, rtol=0)
    torch.testing.assert_close(mid, io["controlnet_mid"], atol=ATOL32, rtol=0)
    torch.testing.assert_close(out, io["unet_out"], atol=ATOL32, rtol=0)
    alone = run(*tiny, io, with_controlnet=False)[2]
    torch.testing.assert_close(alone, io["unet_out_without_controlnet"], atol=ATOL32, rtol=0)
    # The image attentions matter: the same weights without them give other numbers.
    assert (alone - out).abs().max() > 1e-2


@torch.no_grad()
def test_tiny_models_float64_match_official_float64(tiny, io):
    unet, controlnet = (m.to(torch.float64) for m in tiny)
    try:
        _, mid, out = run(unet, controlnet, io, torch.float64)
    finally:
        unet.float(), controlnet.float()
    torch.testing.assert_close(mid, io["controlnet_mid_f64"], atol=ATOL64, rtol=0)
    torch.testing.assert_close(out, io["unet_out_f64"], atol=ATOL64, rtol=0)


@torch.no_grad()
def test_without_image_attention_equals_stock_diffusers(io):
    """use_image_cross_attention=False is the stock model: same keys, same outputs (this checks
    the block loops against diffusers' own forward)."""
    unet_sd = load_file(FIX / "seesr_unet_tiny.safetensors")
    cn_sd = load_file(FIX / "seesr_controlnet_tiny.safetensors")
    plain = {k: v for k, v in unet_sd.items() if ".image_attentions." not in k}
    cn_plain = {k: v for k, v in cn_sd.items() if ".image_attentions." not in k}
    cfg_u = {k: v for k, v in CONFIG["unet"].items() if k != "use_image_cross_attention"}
    cfg_c = {k: v for k, v in CONFIG["controlnet"].items() if k != "use_image_cross_attention"}
    stock_u, stock_c = UNet2DConditionModel(**cfg_u).eval(), ControlNetModel(**cfg_c).eval()
    ours_u = SeeSRUNet(**cfg_u, use_image_cross_attention=False).eval()
    ours_c = SeeSRControlNet(**cfg_c, use_image_cross_attention=False).eval()
    assert layout(ours_u) == layout(stock_u) and layout(ours_c) == layout(stock_c)
    for model, sd in ((stock_u, plain), (ours_u, plain), (stock_c, cn_plain), (ours_c, cn_plain)):
        model.load_state_dict(sd, strict=True)
    args = (io["sample"], io["timestep"], io["encoder_hidden_states"])
    down_s, mid_s = stock_c(*args, io["controlnet_cond"], return_dict=False)
    down_o, mid_o = ours_c(*args, io["controlnet_cond"])
    assert all(torch.equal(a, b) for a, b in zip(down_s, down_o)) and torch.equal(mid_s, mid_o)
    res = {"down_block_additional_residuals": down_s, "mid_block_additional_residual": mid_s}
    assert torch.equal(stock_u(*args, **res).sample, ours_u(*args, **res))
    # odd latent size: the upsampler is told the size of its skip, as in stock
    odd = (io["sample"][..., :13, :15], io["timestep"], io["encoder_hidden_states"])
    assert torch.equal(stock_u(*odd).sample, ours_u(*odd))


def test_image_embeddings_are_required(tiny, io):
    unet, controlnet = tiny
    with pytest.raises(ValueError, match="image_encoder_hidden_states"):
        unet(io["sample"], io["timestep"], io["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"\[B, N, 512\]"):
        controlnet(
            io["sample"],
            io["timestep"],
            io["encoder_hidden_states"],
            io["controlnet_cond"],
            image_encoder_hidden_states=io["encoder_hidden_states"],
        )


def test_gradient_checkpointing_recomputes_with_the_same_loss_and_gradients(io):
    """ControlNet -> UNet with checkpointing off and on: the loss is bit-equal (the same forward
    ops), the gradients of both networks and of the input latent agree within rtol 1e-5 +
    atol 1e-7 (float32; backward may accumulate in another order), and checkpointing really
    recomputes: the SeeSR path's own resnet calls (``seesr_blocks._resnet``, both networks) run
    once more in backward. Under diffusers 0.31 / 0.32 (no ``_gradient_checkpointing_func``)
    this runs torch's checkpoint instead."""
    unet = SeeSRUNet(**CONFIG["unet"])
    unet.load_state_dict(load_file(FIX / "seesr_unet_tiny.safetensors"))
    controlnet = SeeSRControlNet(**CONFIG["controlnet"])
    controlnet.load_state_dict(load_file(FIX / "seesr_controlnet_tiny.safetensors"))
    watched = [net.down_blocks[0].resnets[0] for net in (unet, controlnet)]  # cross-attn blocks
    calls = [0]
    for resnet in watched:  # a pre-hook: torch's recomputation may stop before a forward ends
        resnet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def loss_and_grads():
        for net in (unet, controlnet):
            net.zero_grad()
        sample = io["sample"].clone().requires_grad_(True)
        calls[0] = 0
        loss = run(unet, controlnet, {**io, "sample": sample})[2].square().mean()
        forward_calls = calls[0]
        loss.backward()
        grads = [p.grad.clone() for net in (unet, controlnet) for p in net.parameters()]
        return loss.detach(), [*grads, sample.grad], forward_calls, calls[0]

    loss_a, g_a, fwd_a, total_a = loss_and_grads()
    unet.enable_gradient_checkpointing()
    controlnet.enable_gradient_checkpointing()
    loss_b, g_b, fwd_b, total_b = loss_and_grads()
    assert (fwd_a, total_a) == (2, 2)  # one forward each, no recomputation
    assert (fwd_b, total_b) == (2, 4)  # recomputed once each in backward
    assert torch.equal(loss_a, loss_b)
    assert len(g_a) == len(g_b) and g_a[-1].abs().max() > 0
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ---- layouts ----------------------------------------------------------------------------------
def test_tiny_layouts_match_official_manifests():
    with torch.device("meta"):
        unet = SeeSRUNet(**CONFIG["unet"])
        controlnet = SeeSRControlNet(**CONFIG["controlnet"])
    assert layout(unet) == manifest("seesr_unet_tiny_keys.txt")
    assert layout(controlnet) == manifest("seesr_controlnet_tiny_keys.txt")
    assert controlnet_config(CONFIG["unet"]).items() <= CONFIG["controlnet"].items()


def test_sd2_base_layouts_and_counts_match_official():
    """Full size on the meta device: no memory, no init."""
    cn_config = controlnet_config(SD2_BASE_UNET_CONFIG)
    with torch.device("meta"):
        unet = SeeSRUNet(**SD2_BASE_UNET_CONFIG)
        controlnet = SeeSRControlNet(**cn_config)
        stock_unet = SeeSRUNet(**{**SD2_BASE_UNET_CONFIG, "use_image_cross_attention": False})
    assert layout(unet) == manifest("seesr_unet_sd2base_keys.txt")
    assert layout(controlnet) == manifest("seesr_controlnet_sd2base_keys.txt")
    seesr = COUNTS["seesr_diffusers_0.21.0"]
    assert [len(unet.state_dict()), n_params(unet)] == seesr["seesr_unet_sd2base"]
    assert [len(controlnet.state_dict()), n_params(controlnet)] == seesr["seesr_controlnet_sd2base"]
    stock = COUNTS["stock_diffusers_0.42.1"]["stock042_unet_sd2base"]
    assert [len(stock_unet.state_dict()), n_params(stock_unet)] == stock
    extra = COUNTS["extra_params_image_attentions"]["unet_sd2base"]
    assert n_params(unet) - n_params(stock_unet) == extra


def test_tiny_counts_match_official(tiny):
    unet, controlnet = tiny
    seesr = COUNTS["seesr_diffusers_0.21.0"]
    assert [len(unet.state_dict()), n_params(unet)] == seesr["seesr_unet_tiny"]
    assert [len(controlnet.state_dict()), n_params(controlnet)] == seesr["seesr_controlnet_tiny"]


# ---- folders ----------------------------------------------------------------------------------
def official_folder(tmp_path: Path, role: str, drop=(), extra=()) -> Path:
    """A folder as SeeSR's release has it: a diffusers-0.21 config.json + safetensors."""
    name = {"unet": "seesr_unet_tiny", "controlnet": "seesr_controlnet_tiny"}[role]
    cls_name = {"unet": "UNet2DConditionModel", "controlnet": "ControlNetModel"}[role]
    folder = tmp_path / role
    folder.mkdir()
    config = {"_class_name": cls_name, "_diffusers_version": "0.21.0", **CONFIG[role]}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(FIX / f"{name}.safetensors").items() if k not in drop}
    state.update({k: torch.zeros(1) for k in extra})
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


@torch.no_grad()
def test_official_folders_load_and_reproduce_outputs(tmp_path, io):
    unet = SeeSRUNet.from_folder(official_folder(tmp_path, "unet"))
    controlnet = SeeSRControlNet.from_folder(official_folder(tmp_path, "controlnet"))
    assert not unet.training and next(unet.parameters()).dtype == torch.float32
    _, _, out = run(unet, controlnet, io)
    torch.testing.assert_close(out, io["unet_out"], atol=ATOL32, rtol=0)


@pytest.mark.parametrize("cls", [SeeSRUNet, SeeSRControlNet])
def test_saved_folder_round_trips(tmp_path, tiny, cls):
    model = tiny[0] if cls is SeeSRUNet else tiny[1]
    model.save_folder(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["use_image_cross_attention"] is True
    stock = {SeeSRUNet: "UNet2DConditionModel", SeeSRControlNet: "ControlNetModel"}[cls]
    assert config["_class_name"] == stock  # what the official SeeSR code loads
    loaded = cls.from_folder(tmp_path / "saved")
    assert type(loaded) is cls
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(ref) == list(got) and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("role,cls", [("unet", SeeSRUNet), ("controlnet", SeeSRControlNet)])
def test_folder_with_wrong_keys_names_them(tmp_path, role, cls):
    dropped = "down_blocks.0.image_attentions.0.proj_in.weight"
    folder = official_folder(tmp_path, role, drop=[dropped], extra=["some.extra.weight"])
    with pytest.raises(ValueError) as err:
        cls.from_folder(folder)
    message = str(err.value)
    assert dropped in message and "some.extra.weight" in message
    assert f"{role}/ folder" in message and "missing keys (1)" in message


def test_bin_weights_and_from_config(tmp_path, tiny):
    folder = official_folder(tmp_path, "unet")
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    loaded = SeeSRUNet.from_folder(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny[0].state_dict().items())
    with torch.device("meta"):
        built = SeeSRUNet.from_config(CONFIG["unet"])
    assert layout(built) == layout(tiny[0])


def test_missing_folder_says_what_it_should_hold(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"controlnet/ folder .*config\.json"):
        SeeSRControlNet.from_folder(tmp_path / "nowhere")


# ---- encoder features (TAD-SR) -------------------------------------------------------------
def test_encoder_features_are_the_controlnet_added_skips(tiny, io):
    unet, controlnet = tiny
    captured = {}
    modules = {
        0: unet.conv_in,
        1: unet.down_blocks[0].image_attentions[0],
        2: unet.down_blocks[0].downsamplers[0],
        3: unet.down_blocks[1].resnets[0],
        "mid": unet.mid_block.resnets[-1],
    }
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
        for k, m in modules.items()
    ]
    try:
        with torch.no_grad():
            run(unet, controlnet, io)
    finally:
        for h in hooks:
            h.remove()
    levels = [0, 1, 2, 3, "mid"]
    z_t = io["sample"].clone().requires_grad_(True)
    feats = encoder_features(
        unet,
        controlnet,
        z_t,
        io["timestep"],
        io["encoder_hidden_states"],
        io["image_encoder_hidden_states"],
        io["controlnet_cond"],
        levels,
    )
    for lv, f in zip(levels, feats):
        out = captured[lv][0] if isinstance(captured[lv], tuple) else captured[lv]
        res = io["controlnet_mid"] if lv == "mid" else io[f"controlnet_down_{lv}"]
        torch.testing.assert_close(f.detach(), out + res, atol=ATOL32, rtol=0)
    assert [f.shape[1] for f in feats] == feature_channels(unet, levels) == [32, 32, 32, 64, 64]
    sum(f.mean() for f in feats).backward()
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0


def test_feature_levels_are_validated(tiny):
    unet = tiny[0]
    assert skip_channels(unet) == [32, 32, 32, 64]
    with pytest.raises(ValueError, match=r"4 skips .*\[2, 5, 8, 11\]"):
        feature_channels(unet, TADSR_SEESR_LEVELS)
    with torch.device("meta"):
        sd2 = SeeSRUNet(**SD2_BASE_UNET_CONFIG)
    assert feature_channels(sd2, TADSR_SEESR_LEVELS) == [320, 640, 1280, 1280]
    assert len(skip_channels(sd2)) == 12
