"""The Stable-Diffusion-2-base parts SeeSR runs on, read from a local folder (never a hub).

The folder is a copy of ``stabilityai/stable-diffusion-2-base`` (diffusers layout); SeeSR uses four
of its subfolders: ``vae`` (diffusers ``AutoencoderKL``, f8, 4 latent channels, scaling 0.18215),
``text_encoder`` (transformers ``CLIPTextModel``, OpenCLIP-H, width 1024), ``tokenizer``
(``CLIPTokenizer``, 77 tokens) and ``scheduler`` (``DDPMScheduler`` config: scaled-linear betas
0.00085-0.012, 1000 steps, epsilon prediction, "leading" spacing with steps_offset 1).

``sd2_problems`` / ``seesr_problems`` check the SD-2-base folder and the SeeSR release folder
(``unet/``, ``controlnet/``) without importing diffusers (configs call them on load, so a
``--dry-run`` lists what is missing); ``load_sd2`` loads the parts with ``local_files_only``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SD2_NAME = "stabilityai/stable-diffusion-2-base"

# subfolder -> (alternatives of required file sets, what it holds)
SD2_PARTS: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "vae": (
        (("config.json", "diffusion_pytorch_model.safetensors"),
         ("config.json", "diffusion_pytorch_model.bin")),
        "the diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors or .bin)",
    ),
    "text_encoder": (
        (("config.json", "model.safetensors"), ("config.json", "pytorch_model.bin")),
        "the transformers CLIPTextModel (config.json + model.safetensors or pytorch_model.bin)",
    ),
    "tokenizer": (
        (("vocab.json", "merges.txt"), ("tokenizer.json",)),
        "the CLIPTokenizer (vocab.json + merges.txt, or tokenizer.json)",
    ),
    "scheduler": (
        (("scheduler_config.json",),),
        "the DDPMScheduler config (scheduler_config.json)",
    ),
}  # fmt: skip


def folder_problem(folder: Path, alternatives, what: str) -> str | None:
    """None when ``folder`` holds one of the file sets, else a message naming what is missing."""
    if any(all((folder / f).is_file() for f in files) for files in alternatives):
        return None
    return f"{what} not found in {folder}"


_DIFFUSERS_WEIGHTS = (
    ("config.json", "diffusion_pytorch_model.safetensors"),
    ("config.json", "diffusion_pytorch_model.bin"),
)
# The SeeSR release folder (cswry/SeeSR "preset/models/seesr"): its two diffusers-format networks
SEESR_PARTS: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "unet": (_DIFFUSERS_WEIGHTS, "the UNet (config.json + diffusion_pytorch_model.safetensors "
                                 "or .bin)"),
    "controlnet": (_DIFFUSERS_WEIGHTS, "the ControlNet (config.json + "
                                       "diffusion_pytorch_model.safetensors or .bin)"),
}  # fmt: skip


def parts_problems(root: str | None, parts: dict, name: str) -> dict[str, str]:
    """``{subfolder: message}`` for each part of ``parts`` missing under ``root``."""
    if not root:
        subfolders = ", ".join(f"{p}/" for p in parts)
        return {"": f"not set: the local {name} folder ({subfolders})"}
    problems = {}
    for part, (alternatives, what) in parts.items():
        found = folder_problem(Path(root).expanduser() / part, alternatives, f"{what} of {name}")
        if found:
            problems[part] = found
    return problems


def sd2_problems(root: str | None) -> dict[str, str]:
    """``{subfolder: message}`` for each SD-2-base part missing under ``root``."""
    return parts_problems(root, SD2_PARTS, SD2_NAME)


def seesr_problems(root: str | None) -> dict[str, str]:
    """``{subfolder: message}`` for each SeeSR network missing under ``root``."""
    return parts_problems(root, SEESR_PARTS, "the SeeSR release (cswry/SeeSR preset/models/seesr)")


@dataclass
class SD2:
    """The loaded parts (frozen, eval mode)."""

    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDPMScheduler


def load_sd2(root: str, dtype: torch.dtype = torch.float32) -> SD2:
    """Load vae, text_encoder, tokenizer and scheduler from the local folder ``root``; raises
    FileNotFoundError naming every missing part and what it should hold."""
    problems = sd2_problems(root)
    if problems:
        raise FileNotFoundError("SD-2-base parts missing:\n" + "\n".join(
            f"  - {name or 'folder'}: {msg}" for name, msg in problems.items()))  # fmt: skip
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    root_path = Path(root).expanduser()
    local = {"local_files_only": True}
    vae = AutoencoderKL.from_pretrained(root_path / "vae", **local)
    text_encoder = CLIPTextModel.from_pretrained(root_path / "text_encoder", **local)
    tokenizer = CLIPTokenizer.from_pretrained(root_path / "tokenizer", **local)
    scheduler = DDPMScheduler.from_pretrained(root_path / "scheduler", **local)
    for module in (vae, text_encoder):
        if dtype != torch.float32:  # (diffusers warns on every dtype cast)
            module.to(dtype)
        module.eval().requires_grad_(False)
    return SD2(vae, text_encoder, tokenizer, scheduler)
