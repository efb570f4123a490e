"""A laptop-size random SeeSR teacher written as files: every folder and file the full-size
``configs/tadsr_seesr.yaml`` reads, at tiny sizes, so the whole path (cache job, TAD-SR on Ray)
runs on a CPU. ``python jobs/make_tiny_seesr.py OUT`` writes them; ``configs/tadsr_seesr_tiny.yaml``
and ``configs/cache_seesr_tiny.yaml`` read them from ``weights/tiny_seesr``.

Layout of ``root``: ``sd2/{vae,text_encoder,tokenizer,scheduler}`` (SD-2-base layout),
``seesr/{unet,controlnet}`` (diffusers folders), ``ram/ram.pth`` (official RAM key names),
``ram/tags.txt`` + ``ram/thresholds.txt``. Random weights: numbers for tests, not a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from distsr.models.ram import TINY_RAM

# The SeeSR tiny parity config (seesr_tiny_config.json): SD-2 block types at two levels.
TINY_UNET: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "use_image_cross_attention": True,
}
TINY_RAM_SEESR = replace(TINY_RAM, embed_width=512)  # SeeSR's image attentions read 512 wide
TINY_TAGS = ("cat", "dog", "tree", "sky", "house", "car", "flower", "road", "water", "person")
TINY_MAX_LENGTH = 16  # tokens per prompt (SD-2: 77)
SD2_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False,
                 "prediction_type": "epsilon"}  # fmt: skip


def write_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE tokenizer (no merges) for the prompts' alphabet; returns the
    vocabulary size."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,-!.":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    src = folder.parent / f".{folder.name}_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"),
                              model_max_length=TINY_MAX_LENGTH)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return len(vocab)


def write_sd2(root: Path, width: int) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = write_tokenizer(root / "tokenizer")
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=TINY_MAX_LENGTH, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)  # fmt: skip
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8] * 4,
                        layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)  # fmt: skip
    vae.save_pretrained(root / "vae")
    DDPMScheduler(**SD2_SCHEDULER).save_pretrained(root / "scheduler")


def write_seesr(root: Path, unet_config: dict) -> None:
    from distsr.models.seesr import SeeSRControlNet, SeeSRUNet, controlnet_config

    unet = SeeSRUNet.from_config(unet_config)
    controlnet = SeeSRControlNet.from_config(controlnet_config(unet_config))
    controlnet.load_state_dict(unet.state_dict(), strict=False)  # ControlNet.from_unet's init
    with torch.no_grad():  # zero convs get signal, so the residuals matter in tests
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    unet.save_folder(root / "unet")
    controlnet.save_folder(root / "controlnet")


def write_ram(root: Path) -> dict[str, str]:
    from distsr.models.ram import RAM
    from distsr.models.ram_convert import official_state_dict

    root.mkdir(parents=True, exist_ok=True)
    ram = RAM(TINY_RAM_SEESR)
    with torch.no_grad():
        ram.label_embed.normal_(0, 0.5)
    torch.save({"model": official_state_dict(ram)}, root / "ram.pth")
    (root / "tags.txt").write_text("\n".join(TINY_TAGS) + "\n")
    (root / "thresholds.txt").write_text("\n".join(["0.5"] * len(TINY_TAGS)) + "\n")
    return {"checkpoint": str(root / "ram.pth"), "tag_list": str(root / "tags.txt"),
            "tag_thresholds": str(root / "thresholds.txt")}  # fmt: skip


def write_tiny_seesr(root: str | Path, unet_config: dict | None = None, seed: int = 0) -> dict:
    """Write every part under ``root``; returns the teacher config section (a dict) that reads
    them (``kind: seesr`` with tiny ``ram_model`` and ``process_size``)."""
    root = Path(root)
    unet_config = dict(unet_config or TINY_UNET)
    torch.manual_seed(seed)
    write_sd2(root / "sd2", unet_config["cross_attention_dim"])
    write_seesr(root / "seesr", unet_config)
    ram = write_ram(root / "ram")
    ram_model = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in asdict(TINY_RAM_SEESR).items()}  # fmt: skip
    return {"kind": "seesr", "sd2_dir": str(root / "sd2"), "seesr_dir": str(root / "seesr"),
            "ram": ram, "ram_model": ram_model, "process_size": 32}  # fmt: skip
