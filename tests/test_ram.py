"""RAM + DAPE conformance: the tiny fixture made with the official SeeSR ``ram`` classes (random
weights, LoRA merged by loralib's ``eval()``) and the key list of the released Swin-L model.

Tolerances: the fixture was computed on another machine; float32 matmul/softmax kernels differ
in their last bits between CPUs (here about 10 ulps of each tensor's largest value), so outputs
are compared within 32 ulps at the tensor's scale. So is the preprocessing: a bilinear resize
(2 or, antialiased, a few more taps per output, vectorised) then (x - mean) / std, whose last bit
may differ on another CPU's kernels; PREPROCESS_ULPS = 8 at the tensor's scale (0 here) covers
that and fails on another filter, size or normalisation. The LoRA merge (exact adds and
multiplies) is compared exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distsr.models.ram import RAM, TINY_RAM, RAMConfig, RAMWeights, TagVocabulary
from distsr.models.ram_convert import lora_targets, official_state_dict
from tests.ulps import assert_close_ulps

FIXTURES = Path(__file__).parent / "fixtures" / "ram"
OUTPUT_ULPS = 32
PREPROCESS_ULPS = 8


@pytest.fixture(scope="module")
def tiny_json() -> dict:
    return json.loads((FIXTURES / "ram_tiny_config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "ram_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def vocabulary(tiny_json) -> TagVocabulary:
    return TagVocabulary(tuple(tiny_json["tag_list"]), torch.tensor(tiny_json["class_threshold"]))


@pytest.fixture(scope="module")
def tiny_ram(vocabulary) -> RAM:
    return RAM.from_official(
        FIXTURES / "ram_tiny.safetensors", config=TINY_RAM, vocabulary=vocabulary
    )


def _official_sd() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "ram_tiny.safetensors"))


def test_tiny_preset_has_the_fixture_sizes(tiny_json):
    vis, bert = tiny_json["visual_encoder"], tiny_json["tagging_head_bert"]
    assert (TINY_RAM.image_size, TINY_RAM.patch_size, TINY_RAM.embed_dim) == (
        vis["img_size"],
        vis["patch_size"],
        vis["embed_dim"],
    )
    assert TINY_RAM.depths == tuple(vis["depths"]) and TINY_RAM.num_heads == tuple(vis["num_heads"])
    assert TINY_RAM.window_size == vis["window_size"] and TINY_RAM.mlp_ratio == vis["mlp_ratio"]
    assert TINY_RAM.visual_width == tiny_json["visual_num_features"]
    assert TINY_RAM.num_tokens == tiny_json["num_tokens"]
    assert TINY_RAM.embed_width == bert["encoder_width"] == tiny_json["embed_width_E"]
    assert TINY_RAM.hidden_size == bert["hidden_size"]
    assert TINY_RAM.num_attention_heads == bert["num_attention_heads"]
    assert TINY_RAM.num_layers == bert["num_hidden_layers"]
    assert TINY_RAM.intermediate_size == bert["intermediate_size"]
    assert TINY_RAM.layer_norm_eps == bert["layer_norm_eps"]
    assert TINY_RAM.num_classes == tiny_json["num_class"]
    assert TINY_RAM.lora_alpha == tiny_json["lora"]["lora_alpha"]


def test_tiny_reproduces_official_outputs(tiny_ram, io, tiny_json):
    with torch.no_grad():
        out = tiny_ram(io["image"])
    assert_close_ulps(out.features, io["visual_features"], OUTPUT_ULPS, scale="tensor")
    assert_close_ulps(out.image_embeds, io["image_embeds"], OUTPUT_ULPS, scale="tensor")
    assert_close_ulps(out.logits, io["logits"], OUTPUT_ULPS, scale="tensor")
    assert torch.equal(tiny_ram.vocabulary.targets(out.logits).float(), io["targets"])
    assert tiny_ram.tags(out.logits) == tiny_json["expected_tags"]
    assert torch.equal(tiny_ram.vocabulary.thresholds, io["class_threshold"])


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("which", ["down", "up"])
def test_preprocess_matches_seesr_tensor_resize(io, antialias, which):
    ram = RAM(dataclasses.replace(TINY_RAM, antialias=antialias))
    lq = io[f"pre_raw_{which}_u8_hwc"].permute(2, 0, 1)[None].float() / 255  # ToTensor
    expected = io[f"pre_{which}_antialias_{str(antialias).lower()}"]
    assert_close_ulps(ram.preprocess(lq), expected, PREPROCESS_ULPS, scale="tensor")


def test_tag_and_embed_from_lq(tiny_ram, io):
    lq = io["pre_raw_up_u8_hwc"].permute(2, 0, 1)[None].float() / 255
    tags, embeds = tiny_ram.tag_and_embed(lq)
    with torch.no_grad():  # the official preprocessing's result, from the other machine
        out = tiny_ram(io["pre_up_antialias_false"])
    assert_close_ulps(embeds, out.image_embeds, OUTPUT_ULPS, scale="tensor")
    assert embeds.shape == (1, TINY_RAM.num_tokens, TINY_RAM.embed_width)
    assert tags == tiny_ram.tags(out.logits) and isinstance(tags[0], str)


def test_dape_merge_matches_loralib(tmp_path):
    """RAM file without LoRA + a DAPE file of LoRA tensors only (plus the unused, zero-B
    tag_encoder LoRA the real file carries) -> exactly the loralib-merged weights."""
    sd = _official_sd()
    base = {k: v for k, v in sd.items() if "lora_" not in k}
    dape = {k: v for k, v in sd.items() if "lora_" in k}
    for i in range(TINY_RAM.num_layers):
        for name, width in (("query", TINY_RAM.hidden_size), ("key", TINY_RAM.embed_width)):
            prefix = f"tag_encoder.encoder.layer.{i}.crossattention.self.{name}"
            dape[f"{prefix}.lora_A"] = torch.randn(8, width)
            dape[f"{prefix}.lora_B"] = torch.zeros(TINY_RAM.hidden_size, 8)
    save_file(base, str(tmp_path / "ram.safetensors"))
    save_file(dape, str(tmp_path / "dape.safetensors"))
    ram = RAM.from_official(tmp_path / "ram.safetensors", tmp_path / "dape.safetensors", TINY_RAM)
    merged = load_file(str(FIXTURES / "ram_tiny_merged.safetensors"))
    ours = official_state_dict(ram)
    assert set(ours) == set(merged)
    for key, value in merged.items():
        assert torch.equal(ours[key], value), key
    plain = RAM.from_official(tmp_path / "ram.safetensors", config=TINY_RAM)
    qkv = "visual_encoder.layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(official_state_dict(plain)[qkv], base[qkv])
    assert not torch.equal(ours[qkv], base[qkv])


def test_nonzero_tied_tag_encoder_lora_is_refused(tmp_path):
    sd = _official_sd()
    key = "tag_encoder.encoder.layer.0.crossattention.self.query.lora_B"
    sd[key] = torch.ones(TINY_RAM.hidden_size, 8)
    save_file(sd, str(tmp_path / "ram.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RAM.from_official(tmp_path / "ram.safetensors", config=TINY_RAM)


def test_full_size_has_the_official_inference_keys():
    """Swin-L @384 + the 4585-class head, on the meta device: the persistent keys (official
    names), the derived Swin buffers and the LoRA it merges are exactly the 457 listed."""
    with torch.device("meta"):
        ram = RAM(RAMConfig())
    ours = {k: list(v.shape) for k, v in official_state_dict(ram).items()}
    for name, buf in ram.named_buffers():
        if name.rsplit(".", 1)[-1] in ("relative_position_index", "attn_mask"):
            ours[name] = list(buf.shape)
    for module, (a, b) in lora_targets(ram.cfg).items():
        ours[f"{module}.lora_A"], ours[f"{module}.lora_B"] = list(a), list(b)
    expected = {}
    for line in (FIXTURES / "ram_swin_l_inference_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = json.loads(shape)
    assert ours == expected
    assert sum(p.numel() for p in ram.parameters()) == 212_117_045  # README: inference base


def test_full_size_lora_keys_are_dapes_used_ones():
    used = {}
    for line in (FIXTURES / "dape_lora_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, role = line.split("\t")
            if role.startswith("USED"):
                used[key] = json.loads(shape)
    ours = {
        f"{module}.lora_{ab}": list(shape)
        for module, shapes in lora_targets(RAMConfig()).items()
        for ab, shape in zip("AB", shapes)
    }
    assert ours == used


def test_missing_key_is_named(tmp_path):
    sd = _official_sd()
    key = "tagging_head.encoder.layer.0.output.dense.weight"
    del sd[key]
    path = tmp_path / "ram.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError) as err:
        RAM.from_official(path, config=TINY_RAM)
    assert key in str(err.value) and str(path) in str(err.value)
    assert "ram_swin_large_14m.pth" in str(err.value) and "missing keys (1)" in str(err.value)


def test_unused_keys_skipped_unknown_keys_named(tmp_path):
    sd = _official_sd()
    sd["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.zeros(4, 2)
    sd["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    sd["vision_multi.encoder.layer.0.output.dense.weight"] = sd.pop(
        "tagging_head.encoder.layer.0.output.dense.weight"
    )  # the official loader's older name
    save_file(sd, str(tmp_path / "ok.safetensors"))
    RAM.from_official(tmp_path / "ok.safetensors", config=TINY_RAM)
    sd["image_proj2.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): image_proj2\.weight"):
        RAM.from_official(tmp_path / "bad.safetensors", config=TINY_RAM)


def test_dape_missing_lora_and_missing_files_are_named(tmp_path):
    sd = _official_sd()
    dape = {k: v for k, v in sd.items() if "lora_" in k}
    key = "visual_encoder.layers.1.blocks.0.attn.qkv.lora_B"
    del dape[key]
    save_file(dape, str(tmp_path / "dape.safetensors"))
    with pytest.raises(ValueError, match=rf"DAPE\.pth.*\n.*missing keys \(1\): {key}"):
        RAM.from_official(
            FIXTURES / "ram_tiny.safetensors", tmp_path / "dape.safetensors", TINY_RAM
        )
    with pytest.raises(FileNotFoundError, match="DAPE.pth"):
        RAM.from_official(FIXTURES / "ram_tiny.safetensors", tmp_path / "nope.pth", TINY_RAM)
    weights = RAMWeights(checkpoint=str(tmp_path / "ram.pth"), tag_list=str(tmp_path / "t.txt"))
    assert [key for key, _ in weights.validate()] == ["checkpoint", "tag_list"]


def test_vocabulary_from_files(tmp_path, tiny_json, io):
    names, thresholds = tmp_path / "ram_tag_list.txt", tmp_path / "ram_tag_list_threshold.txt"
    names.write_text("\n".join(tiny_json["tag_list"]))  # the official file: no final newline
    thresholds.write_text("".join(f"{t}\n" for t in tiny_json["class_threshold"]))
    vocabulary = TagVocabulary.from_files(names, thresholds)
    assert vocabulary.strings(io["logits"]) == tiny_json["expected_tags"]
    assert vocabulary.strings(torch.full((1, 10), -9.0)) == [""]
    names.write_text("\n".join(tiny_json["tag_list"][:-1]))
    with pytest.raises(ValueError, match="9 tag names"):
        TagVocabulary.from_files(names, thresholds)


def test_official_pth_layout_loads(tmp_path, tiny_ram):
    """The released file is a pickle with the weights under "model" next to training state."""
    path = tmp_path / "ram_swin_large_14m.pth"
    torch.save({"model": _official_sd(), "epoch": 4, "config": {"image_size": 32}}, path)
    ram = RAM.from_official(path, config=TINY_RAM)
    for key, value in tiny_ram.state_dict().items():
        assert torch.equal(ram.state_dict()[key], value), key


def test_pickled_extras_need_the_config_opt_in(tmp_path, tiny_ram):
    """A RAM file saved with a pickled object next to the weights (an argparse.Namespace, as a
    training script's args): torch's weights_only load refuses it, and the error names the
    file, what torch refused and the key that allows it; with ``ram.trust_pickle: true`` it
    loads the same weights. A pickled DAPE file goes through the same rule."""
    import argparse
    import re

    from distsr.config import from_dict

    path = tmp_path / "ram_swin_large_14m.pth"
    torch.save({"model": _official_sd(), "args": argparse.Namespace(lr=1e-4)}, path)
    weights = from_dict(RAMWeights, {"checkpoint": str(path)})
    assert weights.trust_pickle is False
    with pytest.raises(ValueError) as err:
        RAM.from_weights(weights, TINY_RAM)
    message = str(err.value)
    assert str(path) in message and "weights_only=True" in message
    assert "argparse.Namespace" in message and "ram.trust_pickle: true" in message
    trusted = from_dict(RAMWeights, {"checkpoint": str(path), "trust_pickle": True})
    ram = RAM.from_weights(trusted, TINY_RAM)
    for key, value in tiny_ram.state_dict().items():
        assert torch.equal(ram.state_dict()[key], value), key
    dape = tmp_path / "DAPE.pth"
    lora = {k: v for k, v in _official_sd().items() if "lora_" in k}
    torch.save({**lora, "args": argparse.Namespace(rank=8)}, dape)
    plain = {"checkpoint": str(FIXTURES / "ram_tiny.safetensors"), "dape": str(dape)}
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(dape))}.*argparse\.Namespace.*ram\.trust_pickle"
    ):
        RAM.from_weights(from_dict(RAMWeights, plain), TINY_RAM)
