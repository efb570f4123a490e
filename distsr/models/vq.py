"""ResShift's VQ-f4 autoencoder as a ``diffusers.VQModel``, plus the official-key converter.

The official model is ``ldm.models.autoencoder.VQModelTorch`` (embed_dim 3, 8192 codes, ch 128,
ch_mult [1, 2, 4], 2 res blocks, mid attention only). diffusers' VQModel holds the same weights
exactly under other names; the rename/reshape rules are conformance/resshift/README.md §3.
Pipeline semantics (README §2): encode does NOT quantise, decode DOES quantise first.
"""

from __future__ import annotations

import copy
import re
from os import PathLike

import torch
from diffusers import VQModel

# diffusers.VQModel kwargs that hold the VQ-f4 weights (README §3, vq_f4_diffusers_config.json).
VQ_F4_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 256,
    "num_vq_embeddings": 8192,
    "norm_num_groups": 32,
    "vq_embed_dim": 3,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}


def build_vq_f4(**overrides) -> VQModel:
    """A randomly initialised VQ-f4 ``VQModel``; ``overrides`` replace config entries."""
    unknown = set(overrides) - set(VQ_F4_CONFIG)
    if unknown:
        raise ValueError(
            f"unknown VQ-f4 config keys {sorted(unknown)}; valid: {sorted(VQ_F4_CONFIG)}"
        )
    config = copy.deepcopy(VQ_F4_CONFIG)
    config.update(overrides)
    return VQModel(**config)


# Fixed renames inside a block (README §3); level-dependent ones are handled in _rename.
_MID_RENAMES = (
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".norm_out.", ".conv_norm_out."),
    (".nin_shortcut.", ".conv_shortcut."),
)
_ENC_DOWN = re.compile(r"^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.")
_DEC_UP = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.")
_ATTN_LINEAR = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _rename(key: str, n_levels: int) -> str:
    if m := _ENC_DOWN.match(key):
        level, tail = m.group(1), key[m.end() :]
        part = f"resnets.{m.group(3)}." if m.group(3) is not None else "downsamplers.0."
        key = f"encoder.down_blocks.{level}.{part}{tail}"
    elif m := _DEC_UP.match(key):
        # the decoder's level order is reversed: up.{i} -> up_blocks.{L-1-i}
        level, tail = n_levels - 1 - int(m.group(1)), key[m.end() :]
        part = f"resnets.{m.group(3)}." if m.group(3) is not None else "upsamplers.0."
        key = f"decoder.up_blocks.{level}.{part}{tail}"
    key = "." + key
    for old, new in _MID_RENAMES:
        key = key.replace(old, new)
    return key[1:]


def convert_official_vq(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a VQModelTorch state_dict onto diffusers.VQModel names (README §3).

    Renames the blocks, reverses the decoder level order, and reshapes the mid-attention 1x1 conv
    weights [C, C, 1, 1] to linear weights [C, C]. conv_in/out, quant_conv, post_quant_conv,
    quantize.embedding and the resnet norm/conv weights keep their names.
    """
    levels = {int(m.group(1)) for k in state_dict if (m := _DEC_UP.match(k))}
    n_levels = max(levels) + 1 if levels else 0
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, n_levels)
        if _ATTN_LINEAR.search(new) and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def vq_from_official(path: str | PathLike, **overrides) -> VQModel:
    """Build the VQ-f4 model and strictly load the official ``autoencoder_vq_f4.pth``; eval mode."""
    from distsr.models.checkpoint import load_official_state_dict

    vq = build_vq_f4(**overrides)
    load_official_state_dict(path, vq, converter=convert_official_vq, model_name="ResShift VQ-f4")
    return vq.eval()


def vq_encode(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> latent (encoder + quant_conv, no quantisation, README §2 step 4)."""
    return vq.encode(x).latents


def vq_decode(vq: VQModel, z: torch.Tensor) -> torch.Tensor:
    """Latent -> image: quantise to the nearest code first, then decode (README §2 step 7)."""
    return vq.decode(z, force_not_quantize=False).sample
