"""SeeSR's UNet and ControlNet (Wu et al., CVPR 2024) on diffusers' ``UNet2DConditionModel`` and
``ControlNetModel``, key-compatible with the released diffusers-format ``seesr/unet`` and
``seesr/controlnet`` folders (saved with diffusers 0.21).

Both are the stock SD-2 networks plus ``image_attentions`` (see ``seesr_blocks``): a second
cross-attention transformer after every text cross-attention, reading the RAM image embeddings
``[B, 145, 512]`` (``image_encoder_hidden_states``). The ControlNet residuals enter the UNet as in
stock ControlNet: added to every skip and to the mid-block output.

``SeeSRUNet.encode`` stops after the mid block; ``encoder_features`` gives the TAD-SR
discriminator its inputs, F_k = Enc(z_t, t, c) (TAD-SR Eq. 9), from the teacher's UNet encoder with
its ControlNet residuals added.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from distsr.models.checkpoint import check_state_dict, read_checkpoint
from distsr.models.resshift import MIDDLE, check_levels
from distsr.models.seesr_blocks import (
    DOWN_BLOCKS,
    IMAGE_CROSS_ATTENTION_DIM,
    MID_BLOCKS,
    UP_BLOCKS,
    add_image_attentions,
    encoder,
    has_cross_attention,
    time_embedding,
    up_block,
)

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# The published stabilityai/stable-diffusion-2-base UNet config (the layout of SeeSR's unet/).
SD2_BASE_UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "use_image_cross_attention": True,
}

# Skip indices of the UNet encoder the official TAD-SeeSR discriminator reads (its UNet returns
# the ControlNet-added skips 2, 5, 8, 11 of the 12 SD-2 skips, i.e. the last layer of each
# resolution, before the downsamplers); it does not use the mid block.
TADSR_SEESR_LEVELS: tuple[int, ...] = (2, 5, 8, 11)

# Config fields the SeeSR forward does not implement, with the only value it accepts.
_SD2_ONLY = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_type": "positional",
    "attention_type": "default",
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "global_pool_conditions": False,
}


def _check_layout(config, what: str) -> None:
    """Raise a ValueError naming every config field outside the SD-2 layout SeeSR uses."""
    bad = [
        f"{k}={config[k]!r} (supported: {v!r})"
        for k, v in _SD2_ONLY.items()
        if k in config and config[k] != v
    ]
    blocks = [
        *((t, DOWN_BLOCKS) for t in config["down_block_types"]),
        (config.get("mid_block_type") or MID_BLOCKS[0], MID_BLOCKS),
        *((t, UP_BLOCKS) for t in config.get("up_block_types", ())),
    ]
    bad += [f"block type {t!r} (supported: {list(ok)})" for t, ok in blocks if t not in ok]
    if bad:
        raise ValueError(
            f"{what} supports the SD-2 layout SeeSR uses; this config sets " + "; ".join(bad)
        )


def _attach_image_attentions(model: nn.Module) -> None:
    for block in [*model.down_blocks, model.mid_block, *getattr(model, "up_blocks", ())]:
        if has_cross_attention(block):
            add_image_attentions(block, IMAGE_CROSS_ATTENTION_DIM)


def _check_image_states(model: nn.Module, image_encoder_hidden_states) -> None:
    if not model.config.use_image_cross_attention:
        return
    if image_encoder_hidden_states is None or image_encoder_hidden_states.shape[-1] != (
        IMAGE_CROSS_ATTENTION_DIM
    ):
        shape = None if image_encoder_hidden_states is None else image_encoder_hidden_states.shape
        raise ValueError(
            f"{type(model).__name__} has image cross-attention: pass image_encoder_hidden_states, "
            f"the RAM image embeddings [B, N, {IMAGE_CROSS_ATTENTION_DIM}] (N = 145 for RAM "
            f"Swin-L at 384); got {shape}"
        )


class _FromFolder:
    """``from_folder`` for a diffusers-format folder: config.json + diffusion_pytorch_model.*"""

    _folder_role = ""

    @classmethod
    def config_kwargs(cls, config: dict) -> dict:
        """Constructor kwargs from a saved config: notes (``_*``) dropped, fields this diffusers
        version does not know dropped with a warning."""
        known = set(inspect.signature(cls._stock_class().__init__).parameters)
        known.add("use_image_cross_attention")
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            log.warning("%s: ignoring config fields %s", cls.__name__, unknown)
        return {k: v for k, v in kwargs.items() if k in known}

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Build from a config dict; diffusers' own ``from_config`` reads the constructor
        signature, which here hides the stock fields behind ``**kwargs``."""
        return cls(**cls.config_kwargs({**dict(config or {}), **kwargs}))

    def save_folder(self, path: str | PathLike) -> Path:
        """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors) that
        ``from_folder`` and the official SeeSR code load: the config names the stock class."""
        self.save_pretrained(path, safe_serialization=True)
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text())
        config["_class_name"] = self._stock_class().__name__
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def _stock_class(cls) -> type:
        return next(c for c in cls.__mro__ if c in (UNet2DConditionModel, ControlNetModel))

    @classmethod
    def from_folder(cls, path: str | PathLike, dtype: torch.dtype = torch.float32):
        """Build from ``path/config.json`` and load ``path/diffusion_pytorch_model.safetensors``
        (or ``.bin``) strictly; the network is built on the meta device, so the weights are read
        once. Raises FileNotFoundError / ValueError naming the folder and what it should hold."""
        folder = Path(path)
        expected = (
            f"the SeeSR release's {cls._folder_role}/ folder in diffusers format (config.json + "
            f"{' or '.join(WEIGHT_FILES)})"
        )
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if not (folder / "config.json").is_file() or weights is None:
            raise FileNotFoundError(f"{folder} is not {expected}")
        kwargs = cls.config_kwargs(json.loads((folder / "config.json").read_text()))
        state = read_checkpoint(weights)
        # Configs saved without the flag: the weights say whether the twins exist.
        kwargs.setdefault(
            "use_image_cross_attention", any(".image_attentions." in k for k in state)
        )
        with torch.device("meta"):
            model = cls(**kwargs)
        report = check_state_dict(model, state)
        if report:
            raise ValueError(f"{weights} does not fit {cls.__name__} ({expected}):{report}")
        model.load_state_dict(state, strict=True, assign=True)
        unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if unset:
            raise RuntimeError(f"{cls.__name__}: tensors not in the state_dict: {unset[:10]}")
        return model.to(dtype).eval()


class SeeSRUNet(_FromFolder, UNet2DConditionModel):
    """SeeSR's UNet: the stock ``UNet2DConditionModel`` + ``image_attentions`` in every
    cross-attention block. ``forward`` returns the prediction (epsilon for SD-2-base) as a tensor.
    """

    _folder_role = "unet"

    @register_to_config
    def __init__(self, *, use_image_cross_attention: bool = True, **kwargs):
        super().__init__(**kwargs)
        _check_layout(self.config, "SeeSRUNet")
        if use_image_cross_attention:
            _attach_image_attentions(self)

    def encode(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        image_encoder_hidden_states: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """``(skips, mid, emb)``: the down path's skips (conv_in output, then every down layer
        and downsampler) and the mid-block output, each with its ControlNet residual added."""
        _check_image_states(self, image_encoder_hidden_states)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("pass both ControlNet residuals (down and mid) or neither")
        emb = time_embedding(self, sample, timestep)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        skips, h = encoder(
            self, self.conv_in(sample), emb, encoder_hidden_states, image_encoder_hidden_states
        )
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"{len(down_block_additional_residuals)} ControlNet down residuals for "
                    f"{len(skips)} UNet skips"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        return skips, h, emb

    def decode(self, h, skips, emb, encoder_hidden_states, image_encoder_hidden_states=None):
        """The up path from the mid-block output ``h`` and the encoder ``skips``."""
        # Odd latent sizes: every upsampler but the last is told the size of its skip.
        odd = any(d % 2**self.num_upsamplers for d in skips[0].shape[-2:])
        last = len(self.up_blocks) - 1
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if odd and i < last else None
            h = up_block(
                block, h, mine, emb, encoder_hidden_states, image_encoder_hidden_states, size
            )
        if self.conv_norm_out is not None:
            h = self.conv_act(self.conv_norm_out(h))
        return self.conv_out(h)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        *,
        image_encoder_hidden_states: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        skips, h, emb = self.encode(
            sample,
            timestep,
            encoder_hidden_states,
            image_encoder_hidden_states,
            down_block_additional_residuals,
            mid_block_additional_residual,
        )
        return self.decode(h, skips, emb, encoder_hidden_states, image_encoder_hidden_states)


class SeeSRControlNet(_FromFolder, ControlNetModel):
    """SeeSR's ControlNet: the stock ``ControlNetModel`` + ``image_attentions`` in its down and
    mid cross-attention blocks. ``forward`` returns ``(down residuals, mid residual)``."""

    _folder_role = "controlnet"

    @register_to_config
    def __init__(self, *, use_image_cross_attention: bool = True, **kwargs):
        super().__init__(**kwargs)
        _check_layout(self.config, "SeeSRControlNet")
        if use_image_cross_attention:
            _attach_image_attentions(self)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *,
        image_encoder_hidden_states: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``controlnet_cond``: the bicubic-upscaled lq in [0, 1] at 8x the latent size."""
        _check_image_states(self, image_encoder_hidden_states)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = time_embedding(self, sample, timestep)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips, h = encoder(self, h, emb, encoder_hidden_states, image_encoder_hidden_states)
        down = [conv(s) * conditioning_scale for s, conv in zip(skips, self.controlnet_down_blocks)]
        return down, self.controlnet_mid_block(h) * conditioning_scale


def controlnet_config(
    unet_config, conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
) -> dict:
    """ControlNet kwargs for a UNet config, as SeeSR's training (``ControlNetModel.from_unet``)
    derives them."""
    shared = (
        "in_channels",
        "flip_sin_to_cos",
        "freq_shift",
        "down_block_types",
        "only_cross_attention",
        "block_out_channels",
        "layers_per_block",
        "downsample_padding",
        "mid_block_scale_factor",
        "act_fn",
        "norm_num_groups",
        "norm_eps",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "num_attention_heads",
        "use_linear_projection",
        "upcast_attention",
        "resnet_time_scale_shift",
        "use_image_cross_attention",
    )
    out = {k: unet_config[k] for k in shared if k in unet_config}
    out["conditioning_embedding_out_channels"] = list(conditioning_embedding_out_channels)
    return out


# ---- TAD-SR encoder features ------------------------------------------------------------------
def skip_channels(unet: SeeSRUNet) -> list[int]:
    """Channels of ``unet.encode``'s skips, in order (12 skips for SD-2)."""
    chans = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        out = block.resnets[-1].out_channels
        chans += [out] * (len(block.resnets) + (block.downsamplers is not None))
    return chans


def validate_levels(unet: SeeSRUNet, levels: Sequence) -> tuple:
    """Check levels (skip indices and/or ``"mid"``)."""
    hint = (
        f"The official TAD-SeeSR levels are {list(TADSR_SEESR_LEVELS)} (SD-2: the last layer "
        "of each resolution)."
    )
    return check_levels(levels, skip_channels(unet), "skips", hint)


def feature_channels(unet: SeeSRUNet, levels: Sequence) -> list[int]:
    """Channel counts of ``encoder_features(..., levels)``, in order."""
    chans = skip_channels(unet)
    mid = unet.mid_block.resnets[-1].out_channels
    return [mid if lv == MIDDLE else chans[lv] for lv in validate_levels(unet, levels)]


def encoder_features(
    unet: SeeSRUNet,
    controlnet: SeeSRControlNet,
    z_t: torch.Tensor,
    t,
    encoder_hidden_states: torch.Tensor,
    image_encoder_hidden_states: torch.Tensor | None,
    controlnet_cond: torch.Tensor,
    levels: Sequence,
    conditioning_scale: float = 1.0,
) -> list[torch.Tensor]:
    """F_k = Enc(z_t, t, c) (TAD-SR Eq. 9): the UNet skips at ``levels`` (and/or the mid-block
    output, ``"mid"``) with the ControlNet residuals added, as the official TAD-SeeSR reads them.
    Only the encoder runs. Gradients flow to ``z_t``: wrap in ``torch.no_grad()`` for real
    latents."""
    levels = validate_levels(unet, levels)
    down, mid = controlnet(
        z_t,
        t,
        encoder_hidden_states,
        controlnet_cond,
        image_encoder_hidden_states=image_encoder_hidden_states,
        conditioning_scale=conditioning_scale,
    )
    skips, h, _ = unet.encode(z_t, t, encoder_hidden_states, image_encoder_hidden_states, down, mid)
    return [h if lv == MIDDLE else skips[lv] for lv in levels]
