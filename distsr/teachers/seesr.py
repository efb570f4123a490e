"""The SeeSR teacher (Wu et al., CVPR 2024; METHODS.md §2, SeeSR variant) behind ``Teacher``.

SD-2-base latent space (VAE f8, 4 channels, scaling 0.18215); SeeSR's UNet + ControlNet predict
eps (``SeeSRDenoiser``), conditioned on the CLIP text embedding of the RAM/DAPE tag prompt, the
RAM image embeddings [B, 145, 512] and the bicubic-upscaled lq (ControlNet). As the official
pipeline (``seesr_pipeline_facts.json``):

* ``prepare(lq)``: lq_up = bicubic x scale (short side first enlarged to process_size / scale),
  z_lq = E(lq_up); RAM on the lq as given -> tags + image embeddings; prompt
  ``"<tags>, <prompt>," + added_prompt``; its CLIP embedding. The cache keeps ``stored`` = (z_lq,
  image_embeds, prompt_embeds), so training never runs RAM, the text encoder or the VAE encoder
  on lq; lq_up is recomputed from lq (cheap).
* ``prior``: z_T = sqrt(abar_999) z_lq + sqrt(1 - abar_999) eps (start point "lr", t = 999).
* ``sample``: DDPM (fixed-small variance) over the ``steps`` "leading" timesteps 981 ... 1 with
  classifier-free guidance eps = eps_u + g (eps_c - eps_u), batch order [negative, prompt], RAM
  embeddings duplicated for both halves. Every step adds its own eps, so it consumes 1 + steps
  noise tensors (``teachers.noise``): a target is a function of (stored, seed).
* ``restore``: the whole inference pipeline (prepare, sample, decode, AdaIN colour fix).

Differences from the official pipeline, on purpose: the VAE latent of lq and gt is the posterior
mean (official: an unseeded ``latent_dist.sample()``), so cached targets are reproducible; the
bicubic up-scaling is torch's (a = -0.75) in one resize, not PIL's (a = -0.5) in two. ``sample``
runs the whole latent through ``denoiser`` (default: the frozen pair); inference passes a latent-
tiled one (``inference.seesr.TiledDenoiser``: tiles with overlap, Gaussian blending). The VAE
runs untiled (no tiled VAE yet), which bounds the image size by memory.

TAD-SR (official TAD-SeeSR ``train_tadsr.py``): the student is a copy of UNet + ControlNet run
once at t = 999 from z_T, x0 = (z_T - sqrt(1 - abar) eps) / sqrt(abar); the discriminator reads
the UNet encoder skips 2, 5, 8, 11 with the ControlNet residuals added (``TADSR_SEESR_LEVELS``);
``sqrt_snr`` = sqrt(abar_t / (1 - abar_t)) turns the x0-space HSD of ``losses.hsd`` into the
official eps-space one. Differences from the official TAD-SeeSR training: the student's input is
the LR latent noised at t = 999 (official: the GT latent); the discriminator's and HSD's features
use lq's ControlNet condition and RAM embeddings (official: those of gt); one t per sample
(official: one per batch); latents are the VAE posterior mean (official: an unseeded sample); the
bicubic up-scaling is torch's (official: PIL's, in two steps); by default the training text (the
student's, the features' and HSD's) is the inference prompt of lq's tags, never dropped.
Official: RAM's tags of gt as ``"<tags>,"`` (SeeSR's make_tags.py), the empty prompt with
probability ``null_text_ratio`` 0.5 per sample: ``train_prompt: gt`` (``prepare_gt`` tags gt
with this teacher's RAM, DAPE merged, where make_tags.py used RAM alone; cached as
``prompt_embeds_gt``) and the recipe's ``null_text_ratio`` (``train_cond``).

The teacher prints one ``[distsr] SeeSR teacher: ...`` line the first time it runs RAM + the text
encoder on lq, takes the condition from stored (cached) entries, or runs its sampler, so a run's
log shows whether training read only the cache.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distsr.fingerprint import hash_modules
from distsr.models.checkpoint import check_state_dict, read_checkpoint
from distsr.models.ram import RAM
from distsr.models.sd2 import SD2, load_sd2
from distsr.models.seesr import (
    IMAGE_CROSS_ATTENTION_DIM,
    SeeSRControlNet,
    SeeSRUNet,
    encoder_features,
    feature_channels,
)
from distsr.teachers.base import Teacher
from distsr.teachers.seesr_config import SeeSRTeacherConfig

# config fields that change what ``sample`` returns (fingerprint parts)
SAMPLER_KEYS = ("steps", "guidance_scale", "conditioning_scale", "start_timestep", "prompt",
                "added_prompt", "negative_prompt", "process_size", "dtype")  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SeeSRDenoiser(nn.Module):
    """SeeSR's UNet + ControlNet as one eps network: the teacher's frozen pair and, copied, the
    TAD-SR student (its state_dict: ``unet.*`` and ``controlnet.*``, official names inside)."""

    def __init__(self, unet: SeeSRUNet, controlnet: SeeSRControlNet, conditioning_scale=1.0):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale = conditioning_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def _inputs(self, z_t, t, cond: dict):
        dtype = self.dtype
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])
        return (z_t.to(dtype), t, cond["prompt_embeds"].to(dtype),
                cond["image_embeds"].to(dtype), cond["lq_up"].to(dtype))  # fmt: skip

    def forward(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """eps_hat(z_t, t, c) in float32; ``cond`` holds prompt_embeds, image_embeds, lq_up."""
        z_t, t, text, image, lq_up = self._inputs(z_t, t, cond)
        down, mid = self.controlnet(z_t, t, text, lq_up, image_encoder_hidden_states=image,
                                    conditioning_scale=self.conditioning_scale)  # fmt: skip
        eps = self.unet(
            z_t,
            t,
            text,
            image_encoder_hidden_states=image,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        return eps.float()

    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """F_k = Enc(z_t, t, c) (TAD-SR Eq. 9): UNet skips with ControlNet residuals added."""
        z_t, t, text, image, lq_up = self._inputs(z_t, t, cond)
        return encoder_features(self.unet, self.controlnet, z_t, t, text, image, lq_up, levels,
                                self.conditioning_scale)  # fmt: skip


def ddpm_step(abar: torch.Tensor, eps, t: int, prev_t: int, z_t, noise) -> torch.Tensor:
    """One DDPM posterior step z_t -> z_{prev_t} (Ho et al. 2020, Eq. 6-7; fixed-small variance,
    no clipping: diffusers ``DDPMScheduler.step`` with the SD-2-base config) with the given eps;
    ``abar`` is float64, the result float32."""
    a_t = abar[t]
    a_prev = abar[prev_t] if prev_t >= 0 else torch.ones((), dtype=abar.dtype, device=abar.device)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    x0 = (z_t - (1 - a_t).sqrt().float() * eps) / a_t.sqrt().float()
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)).float() * x0 + (
        alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
    ).float() * z_t
    if t == 0:
        return mean
    variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
    return mean + variance.sqrt().float() * noise.to(mean.dtype)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5):
    """SeeSR's "adain" colour fix: per image and channel, ``image``'s mean / std (unbiased
    variance + eps) replaced by ``reference``'s (the bicubic-upscaled lq); clamped to [0, 1]."""

    def stats(x):
        flat = x.float().flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    mean, std = stats(image)
    ref_mean, ref_std = stats(reference)
    return ((image.float() - mean) / std * ref_std + ref_mean).clamp(0, 1)


class SeeSRTeacher(Teacher):
    """Frozen SeeSR: SD-2-base VAE + CLIP text encoder, RAM (DAPE), UNet + ControlNet, DDPM."""

    kind = "seesr"
    stored = ("z_lq", "image_embeds", "prompt_embeds")

    def __init__(self, cfg: SeeSRTeacherConfig, denoiser: SeeSRDenoiser, sd2: SD2, ram: RAM):
        super().__init__()
        self.cfg = cfg
        if cfg.train_prompt == "gt":  # the gt-tag prompt is cached beside the lq condition
            self.stored = (*SeeSRTeacher.stored, "prompt_embeds_gt")
        self.denoiser, self.vae, self.text_encoder, self.ram = (
            denoiser, sd2.vae, sd2.text_encoder, ram)  # fmt: skip
        self.tokenizer, self.scheduler = sd2.tokenizer, sd2.scheduler
        check_scheduler(self.scheduler.config)
        abar = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64)
        self.register_buffer("abar", abar, persistent=False)
        self.scheduler.set_timesteps(cfg.steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.scaling = float(self.vae.config.scaling_factor)
        for t in (cfg.start_timestep, cfg.student_timestep):
            if t >= self.num_timesteps:
                raise ValueError(f"timestep {t} is outside the schedule's {self.num_timesteps}")
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.denoiser)
        self.freeze()
        self._negative: torch.Tensor | None = None
        self._empty: torch.Tensor | None = None
        self._weights_hash: str | None = None
        self._announced: set[str] = set()

    def _announce(self, what: str, line: str) -> None:
        """Print ``line`` the first time this teacher does ``what`` (see the module doc)."""
        if what not in self._announced:
            self._announced.add(what)
            print(f"[distsr] SeeSR teacher: {line}", flush=True)

    @property
    def noise_tensors(self) -> int:
        return 1 + len(self.timesteps)  # z_T's eps, then one per DDPM step

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # ---- condition --------------------------------------------------------------------------
    def upscale(self, lq: torch.Tensor) -> torch.Tensor:
        """The ControlNet condition: lq in [0, 1] -> bicubic x scale to a multiple of 8 (short
        side first enlarged to process_size / scale, as the official test script)."""
        h, w = lq.shape[-2:]
        short = self.cfg.process_size // self.cfg.scale
        if min(h, w) < short:
            h, w = int(h * short / min(h, w)), int(w * short / min(h, w))
        size = (h * self.cfg.scale // 8 * 8, w * self.cfg.scale // 8 * 8)
        up = F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False)
        return up.clamp(0, 1)

    def prompts(self, tags: list[str]) -> list[str]:
        """The official prompt string: ``f"{tags}, {prompt}," + added_prompt``."""
        return [f"{t}, {self.cfg.prompt}," + self.cfg.added_prompt for t in tags]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states [B, 77, D] (padded to the tokenizer's max length), float32."""
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return self.text_encoder(ids.to(self.device))[0].float()

    def prepare(self, lq: torch.Tensor, stored: dict | None = None) -> dict[str, torch.Tensor]:
        """``{"lq_up", "z_lq", "image_embeds", "prompt_embeds"}`` from lq in [0, 1]; with
        ``stored`` (the cache's entries) only lq_up is computed."""
        lq = lq.to(self.device, torch.float32)
        cond = {"lq_up": self.upscale(lq)}
        if stored is not None:
            self._announce("stored", "condition from stored entries (no RAM, no text encoder)")
            return {**cond, **{k: stored[k].to(self.device, torch.float32) for k in self.stored}}
        self._announce("live", "running RAM, the text encoder and the VAE encoder on lq")
        tags, image_embeds = self.ram.tag_and_embed(lq)
        cond["z_lq"] = self._encode(cond["lq_up"])
        cond["image_embeds"] = image_embeds.float()
        cond["prompt_embeds"] = self.encode_text(self.prompts(tags))
        return cond

    def prepare_gt(self, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """``train_prompt: gt``: ``{"prompt_embeds_gt"}``, the CLIP embedding of RAM's tags of gt
        in [0, 1] as ``"<tags>,"`` (official: SeeSR's make_tags.py file, no added prompt)."""
        if self.cfg.train_prompt != "gt":
            return {}
        self._announce("gt", "running RAM and the text encoder on gt (train_prompt: gt)")
        tags, _ = self.ram.tag_and_embed(gt.to(self.device, torch.float32))
        return {"prompt_embeds_gt": self.encode_text([f"{t}," for t in tags])}

    def train_cond(self, cond: dict, drop: torch.Tensor | None = None) -> dict:
        """TAD-SR's training condition: ``prompt_embeds`` = the ``train_prompt``'s text, the empty
        prompt for the samples where ``drop`` [B] is true (official: ``null_text_ratio``)."""
        gt = self.cfg.train_prompt == "gt"
        text = cond["prompt_embeds_gt" if gt else "prompt_embeds"]
        if drop is not None:
            empty = self.empty_prompt_embeds().to(text.device)
            text = torch.where(drop.to(text.device).view(-1, 1, 1), empty, text)
        return {**cond, "prompt_embeds": text}

    def empty_prompt_embeds(self) -> torch.Tensor:
        """CLIP("") [1, 77, D], float16-rounded as the stored prompts are."""
        if self._empty is None or self._empty.device != self.device:
            self._empty = self.encode_text([""]).half().float()
        return self._empty

    def noise_shape(self, cond: dict) -> tuple[int, ...]:
        return tuple(cond["z_lq"].shape[1:])

    # ---- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.to(self.device) * 2 - 1).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.scaling

    def encode_gt(self, gt: torch.Tensor) -> torch.Tensor:
        return self._encode(gt)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z0.to(self.device) / self.scaling).to(self.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # ---- diffusion --------------------------------------------------------------------------
    def _abar(self, t, like: torch.Tensor) -> torch.Tensor:
        """abar_t as float64 [B, 1, ...] for int or [B] steps."""
        t = torch.as_tensor(t, device=self.abar.device, dtype=torch.long).reshape(-1)
        abar = self.abar[t].expand(like.shape[0]) if t.numel() == 1 else self.abar[t]
        return abar.to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def prior(self, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """z_T = sqrt(abar_s) z_lq + sqrt(1 - abar_s) eps, s = start_timestep (999)."""
        z_lq = cond["z_lq"]
        noise = noise.to(z_lq.device, torch.float32)
        return self.noised(z_lq, self.cfg.start_timestep, cond,
                           noise if noise.dim() == z_lq.dim() else noise[0])  # fmt: skip

    def noised(self, z0: torch.Tensor, t, cond: dict, noise: torch.Tensor) -> torch.Tensor:
        """q(z_t | z0) = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (DDPM forward process)."""
        abar = self._abar(t, z0)
        return abar.sqrt().float() * z0 + (1 - abar).sqrt().float() * noise.to(z0.dtype)

    def _x0(self, z_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t, z_t)
        return (z_t.float() - (1 - abar).sqrt().float() * eps) / abar.sqrt().float()

    def denoise(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        """x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), the prompt's eps (no CFG)."""
        return self._x0(z_t, t, self.denoiser(z_t, t, cond))

    def sqrt_snr(self, t, like: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) / sqrt(1 - abar_t) as float32 [B, 1, ...]."""
        abar = self._abar(t, like)
        return (abar / (1 - abar)).sqrt().float()

    def negative_embeds(self, batch: int) -> torch.Tensor:
        if self._negative is None or self._negative.device != self.device:
            self._negative = self.encode_text([self.cfg.negative_prompt])
        return self._negative.expand(batch, -1, -1)

    def _guided_eps(self, net, z: torch.Tensor, t: int, cond: dict, doubled: dict | None):
        if doubled is None:  # guidance <= 1: the prompt's pass only
            return net(z, t, cond)
        eps_u, eps_c = net(torch.cat([z, z]), t, doubled).chunk(2)
        return eps_u + self.cfg.guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def sample(self, cond: dict, noise: torch.Tensor, denoiser=None) -> torch.Tensor:
        """The full DDPM trajectory with CFG from z_T = prior(cond, noise[0]); step i adds
        noise[1 + i]. ``noise``: [1 + steps, B, 4, h, w] (``noise_for(..., tensors=
        teacher.noise_tensors)``). ``denoiser``: the eps network ``(z_t, t, cond) -> eps``
        (default: the frozen UNet + ControlNet; inference passes a latent-tiled one)."""
        net = self.denoiser if denoiser is None else denoiser
        z_lq = cond["z_lq"]
        if noise.dim() != z_lq.dim() + 1 or noise.shape[0] != self.noise_tensors:
            raise ValueError(
                f"SeeSR's DDPM sampler needs noise [{self.noise_tensors}, B, C, h, w] (prior eps "
                f"+ one per step; noise_for(..., tensors=teacher.noise_tensors)), got "
                f"{tuple(noise.shape)}"
            )
        noise = noise.to(z_lq.device, torch.float32)
        doubled = None
        if self.cfg.guidance_scale > 1:  # CFG batch order [negative, prompt]
            neg = self.negative_embeds(z_lq.shape[0])
            doubled = {
                "prompt_embeds": torch.cat([neg, cond["prompt_embeds"]]),
                **{k: torch.cat([cond[k], cond[k]]) for k in ("image_embeds", "lq_up")},
            }
        self._announce("sample", f"running the {len(self.timesteps)}-step DDPM sampler")
        z = self.prior(cond, noise[0])
        steps = self.timesteps
        for i, t in enumerate(steps):
            prev_t = steps[i + 1] if i + 1 < len(steps) else -1
            z = ddpm_step(self.abar, self._guided_eps(net, z, t, cond, doubled), t, prev_t, z,
                          noise[1 + i])  # fmt: skip
        return z

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """SeeSR inference: lq [0, 1] -> sr [0, 1] (sample, decode, AdaIN colour fix to lq_up)."""
        cond = self.prepare(lq)
        if noise is None:
            noise = torch.randn(self.noise_tensors, lq.shape[0], *self.noise_shape(cond))
        sr = self.decode(self.sample(cond, noise))
        return adain_color_fix(sr, cond["lq_up"])

    # ---- TAD-SR -----------------------------------------------------------------------------
    def features(self, z_t: torch.Tensor, t, cond: dict, levels: Sequence) -> list[torch.Tensor]:
        """Encoder features (TAD-SR Eq. 9; official TAD-SeeSR levels: skips 2, 5, 8, 11)."""
        return self.denoiser.features(z_t, t, cond, levels)

    def feature_channels(self, levels: Sequence) -> list[int]:
        return feature_channels(self.denoiser.unet, levels)

    def make_student(self) -> nn.Module:
        """A trainable copy of UNet + ControlNet; ``student_trainable`` restricts which
        parameters train (official TAD-SeeSR: image_attentions + controlnet_cond_embedding)."""
        student = copy.deepcopy(self.denoiser).train()
        names = self.cfg.student_trainable
        for name, param in student.named_parameters():
            param.requires_grad_(names is None or any(n in name.split(".") for n in names))
        return student

    def student_step(self, net, z_T: torch.Tensor, cond: dict) -> torch.Tensor:
        """x0 = (z_T - sqrt(1 - abar) eps) / sqrt(abar) at student_timestep (999), float32."""
        t = self.cfg.student_timestep
        return self._x0(z_T, t, net(z_T, t, cond))

    def partitionable(self) -> dict[str, nn.Module]:
        return {"teacher": self.denoiser}

    # ---- identity ---------------------------------------------------------------------------
    def fingerprint_parts(self) -> dict:
        if self._weights_hash is None:  # frozen weights: hash once
            d = self.denoiser
            arch = {"unet": dict(d.unet.config), "controlnet": dict(d.controlnet.config),
                    "ram": asdict(self.ram.cfg), "vocabulary": vocabulary_parts(self.ram),
                    "tokenizer": tokenizer_parts(self.tokenizer)}  # fmt: skip
            modules = [("unet", d.unet), ("controlnet", d.controlnet), ("vae", self.vae),
                       ("text_encoder", self.text_encoder), ("ram", self.ram)]  # fmt: skip
            self._weights_hash = hash_modules(modules, extra=arch)
        cfg = self.cfg
        sampler = {k: getattr(cfg, k) for k in SAMPLER_KEYS}
        scheduler = json.loads(json.dumps(dict(self.scheduler.config), default=str))
        parts = {"kind": self.kind, "weights": self._weights_hash, "sampler": sampler,
                 "scheduler": scheduler, "scale": cfg.scale}  # fmt: skip
        if cfg.train_prompt == "gt":  # the cache holds prompt_embeds_gt too
            parts["train_prompt"] = cfg.train_prompt
        return parts


def vocabulary_parts(ram: RAM) -> list:
    vocab = ram.vocabulary
    return [] if vocab is None else [list(vocab.names), vocab.thresholds.tolist()]


def tokenizer_parts(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return {"vocab": blob, "max_length": int(tokenizer.model_max_length)}


def check_scheduler(config) -> None:
    """The sampler implements SD-2-base's DDPM settings; anything else is refused by name."""
    wanted = {"prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": False,
              "thresholding": False}  # fmt: skip
    bad = [f"{k}={config.get(k)!r} (supported: {v!r})" for k, v in wanted.items()
           if config.get(k, v) != v]  # fmt: skip
    if bad:
        raise ValueError("SeeSR's DDPM sampler supports the SD-2-base scheduler; this "
                         "scheduler_config.json sets " + "; ".join(bad))  # fmt: skip


def enable_checkpointing(denoiser: SeeSRDenoiser) -> None:
    denoiser.unet.enable_gradient_checkpointing()
    denoiser.controlnet.enable_gradient_checkpointing()


def build_seesr_teacher(
    cfg: SeeSRTeacherConfig,
    device: torch.device | str = "cpu",
    denoiser: SeeSRDenoiser | None = None,
):
    """Load every part from the configured local paths (strictly); frozen, eval. A given
    ``denoiser`` (a trained student, ``load_seesr_denoiser``) replaces the release's UNet +
    ControlNet, which are then not read."""
    problems = cfg.validate()
    if problems:
        lines = "\n".join(f"  - {key}: {msg}" for key, msg in problems)
        raise ValueError(f"invalid SeeSR teacher config:\n{lines}")
    if cfg.ram_model.embed_width != IMAGE_CROSS_ATTENTION_DIM:
        raise ValueError(
            f"ram_model.embed_width must be {IMAGE_CROSS_ATTENTION_DIM} (SeeSR's image "
            f"cross-attention width), got {cfg.ram_model.embed_width}"
        )
    dtype = DTYPES[cfg.dtype]
    sd2 = load_sd2(cfg.sd2_dir, dtype)
    if denoiser is None:
        seesr = Path(cfg.seesr_dir).expanduser()
        unet = SeeSRUNet.from_folder(seesr / "unet", dtype)
        controlnet = SeeSRControlNet.from_folder(seesr / "controlnet", dtype)
        denoiser = SeeSRDenoiser(unet, controlnet, cfg.conditioning_scale)
    denoiser = denoiser.to(dtype)
    width = sd2.text_encoder.config.hidden_size
    unet_width = denoiser.unet.config.cross_attention_dim
    if width != unet_width:
        raise ValueError(f"the text encoder's width {width} does not fit the UNet's "
                         f"cross_attention_dim {unet_width}")  # fmt: skip
    ram = RAM.from_weights(cfg.ram, cfg.ram_model).to(dtype)
    return SeeSRTeacher(cfg, denoiser, sd2, ram).to(device)


def load_seesr_denoiser(cfg: SeeSRTeacherConfig, weights: str | Path) -> SeeSRDenoiser:
    """A trained SeeSR student: UNet + ControlNet with the architecture of the release's
    ``seesr_dir/{unet,controlnet}/config.json`` and the weights of ``weights`` (an exported
    ``student[_ema].safetensors``: ``unet.*`` + ``controlnet.*``, official names inside), loaded
    strictly (float32). Raises ValueError naming missing / unexpected keys."""
    state = read_checkpoint(Path(weights))
    parts = {"unet": SeeSRUNet, "controlnet": SeeSRControlNet}
    stray = sorted(k for k in state if k.split(".", 1)[0] not in parts)
    if stray:
        raise ValueError(f"{weights} is not a SeeSR student (keys unet.* and controlnet.*); "
                         f"unexpected keys: {stray[:10]}")  # fmt: skip
    nets = {}
    for name, cls in parts.items():
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        config_path = Path(cfg.seesr_dir).expanduser() / name / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: the SeeSR release's {name} config")
        kwargs = cls.config_kwargs(json.loads(config_path.read_text()))
        kwargs.setdefault("use_image_cross_attention", any(".image_attentions." in k for k in sub))
        with torch.device("meta"):
            net = cls(**kwargs)
        report = check_state_dict(net, sub)
        if report:
            raise ValueError(f"{weights}: the {name}.* weights do not fit {config_path}:{report}")
        # own storage per tensor: views into the file's buffer are not SIMD-aligned, which
        # changes the last bits of the kernels' results
        net.load_state_dict({k: v.clone() for k, v in sub.items()}, strict=True, assign=True)
        nets[name] = net.float().eval()
    return SeeSRDenoiser(nets["unet"], nets["controlnet"], cfg.conditioning_scale)
