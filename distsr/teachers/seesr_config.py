"""Config of the SeeSR teacher (``teachers.seesr``), kept free of diffusers/transformers imports
so that configs load fast and ``--dry-run`` plans without them.

Defaults are the official SeeSR inference settings (cswry/SeeSR ``test_seesr.py`` +
``pipelines/pipeline_seesr.py``): 50 DDPM steps, classifier-free guidance 5.5, start latent = the
LR latent noised at t = 999, prompt ``"<tags>, <prompt>," + "clean, high-resolution, 8k"``,
negative prompt ``"dotted, noise, blur, lowres, smooth"``, x4, process size 512.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distsr.config import MissingFile
from distsr.models.ram import RAMConfig, RAMWeights
from distsr.models.sd2 import sd2_problems, seesr_problems

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SeeSRTeacherConfig:
    """A frozen SeeSR teacher: SD-2-base parts + SeeSR UNet/ControlNet + RAM (DAPE) + sampler."""

    kind: Literal["seesr"] = "seesr"
    sd2_dir: str | None = None  # stable-diffusion-2-base: vae/ text_encoder/ tokenizer/ scheduler/
    seesr_dir: str | None = None  # the SeeSR release folder: unet/ controlnet/
    ram: RAMWeights = field(default_factory=RAMWeights)  # RAM + DAPE + tag list/thresholds
    ram_model: RAMConfig = field(default_factory=RAMConfig)  # sizes (default: Swin-L @ 384)
    scale: int = 4
    process_size: int = 512  # lq whose short side < process_size / scale is first enlarged
    prompt: str = ""  # the user prompt between the tags and added_prompt
    added_prompt: str = "clean, high-resolution, 8k"
    negative_prompt: str = "dotted, noise, blur, lowres, smooth"
    steps: int = 50  # DDPM steps of the teacher trajectory
    guidance_scale: float = 5.5  # classifier-free guidance; <= 1: the conditional pass only
    conditioning_scale: float = 1.0  # ControlNet residual scale
    start_timestep: int = 999  # z_T = the LR latent noised at this t (official "start_point: lr")
    student_timestep: int = 999  # the one step a TAD-SR student takes (official TAD-SeeSR)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the frozen networks' dtype
    gradient_checkpointing: bool = False  # student and teacher UNet/ControlNet (backward memory)
    # the student's trainable parameters: those with one of these module names in their path
    # (official TAD-SeeSR: [image_attentions, controlnet_cond_embedding]); null: all of them
    student_trainable: list[str] | None = None
    # TAD-SR's training text (the student, the discriminator's features, HSD): "lq" the condition's
    # prompt (lq tags + prompt + added_prompt, as at inference); "gt" RAM's tags of gt as
    # ``"<tags>,"`` with no added prompt (official TAD-SeeSR: train_tadsr.py reads SeeSR's
    # make_tags.py files). "gt" also stores ``prompt_embeds_gt`` in the cache (a fingerprint part
    # only then, so lq caches keep theirs); the teacher's trajectory keeps the lq prompt
    train_prompt: Literal["lq", "gt"] = "lq"  # official TAD-SeeSR: gt

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for key, found in (("sd2_dir", sd2_problems(self.sd2_dir)),
                           ("seesr_dir", seesr_problems(self.seesr_dir))):  # fmt: skip
            problems += [MissingFile(key, msg) for msg in found.values()]
        ram_files = {
            "checkpoint": "the RAM checkpoint (ram_swin_large_14m.pth)",
            "tag_list": "RAM tag names (ram_tag_list.txt)",
            "tag_thresholds": "RAM class thresholds (ram_tag_list_threshold.txt)",
        }
        for key, what in ram_files.items():
            if not getattr(self.ram, key):
                problems.append(MissingFile(f"ram.{key}", f"not set: {what}"))
        if self.scale < 1:
            problems.append(("scale", f"must be >= 1, got {self.scale}"))
        if self.steps < 1:
            problems.append(("steps", f"must be >= 1, got {self.steps}"))
        if self.guidance_scale < 0:
            problems.append(("guidance_scale", f"must be >= 0, got {self.guidance_scale}"))
        for key in ("start_timestep", "student_timestep"):
            if getattr(self, key) < 0:
                problems.append((key, f"must be >= 0, got {getattr(self, key)}"))
        return problems
