"""SeeSR's image cross-attention on diffusers' own UNet blocks.

SeeSR (Wu et al., CVPR 2024) puts beside every text cross-attention ``Transformer2DModel`` of the
SD-2 UNet (and of its ControlNet) a twin ``Transformer2DModel``, ``image_attentions[j]``, whose
cross-attention reads the RAM image embeddings ``[B, 145, 512]`` instead of the CLIP text
embeddings. Within a layer the order is resnet -> text attention -> image attention; every
transformer keeps its own outer residual.

The blocks stay the stock diffusers modules (``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D``, ``DownBlock2D``, ``UpBlock2D``); ``add_image_attentions`` gives a block its
twins and ``down_block`` / ``mid_block`` / ``up_block`` run it with the twins in place. Calling a
block module directly runs the stock forward, which skips the twins.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

# Width of the RAM image embedding: SeeSR hard-codes it in the block constructors (not in config).
IMAGE_CROSS_ATTENTION_DIM = 512

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def has_cross_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def image_twin(text_attention: nn.Module, dim: int = IMAGE_CROSS_ATTENTION_DIM) -> nn.Module:
    """A ``Transformer2DModel`` laid out like ``text_attention`` (heads, head dim, layers,
    projections) whose cross-attention keys and values come from ``dim``-wide tokens."""
    kwargs = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    return type(text_attention)(**{**kwargs, "cross_attention_dim": dim})


def add_image_attentions(block: nn.Module, dim: int = IMAGE_CROSS_ATTENTION_DIM) -> None:
    """Register ``block.image_attentions`` (one twin per ``block.attentions[j]``) right after
    ``block.resnets``, which is where SeeSR's state_dict has them."""
    twins = nn.ModuleList(image_twin(attn, dim) for attn in block.attentions)
    children = list(block._modules.items())
    at = [name for name, _ in children].index("resnets") + 1
    block._modules.clear()
    block._modules.update(children[:at] + [("image_attentions", twins)] + children[at:])


def _resnet(block: nn.Module, resnet: nn.Module, h: torch.Tensor, emb: torch.Tensor):
    """``resnet(h, emb)``, recomputed in backward when the block checkpoints: through the
    function ``enable_gradient_checkpointing`` set (diffusers >= 0.33), else (0.31, 0.32: the
    blocks call torch's checkpoint inline) torch's non-reentrant checkpoint, as diffusers does."""
    if not (torch.is_grad_enabled() and block.gradient_checkpointing):
        return resnet(h, emb)
    func = getattr(block, "_gradient_checkpointing_func", None)
    if func is None:
        return torch.utils.checkpoint.checkpoint(resnet, h, emb, use_reentrant=False)
    return func(resnet, h, emb)


def _attend(block: nn.Module, j: int, h: torch.Tensor, text: torch.Tensor, image):
    """Text cross-attention ``attentions[j]``, then (SeeSR) image cross-attention."""
    h = block.attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
    twins = getattr(block, "image_attentions", None)
    if twins is not None:
        h = twins[j](h, encoder_hidden_states=image, return_dict=False)[0]
    return h


def down_block(block: nn.Module, h, emb, text, image):
    """``(h, skips)`` of one down block; the skips are what the up path and ControlNet read."""
    if not has_cross_attention(block):
        return block(h, emb)
    skips = ()
    for j, resnet in enumerate(block.resnets):
        h = _attend(block, j, _resnet(block, resnet, h, emb), text, image)
        skips += (h,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            h = downsampler(h)
        skips += (h,)
    return h, skips


def mid_block(block: nn.Module, h, emb, text, image):
    """resnet0 -> [text attention -> image attention -> resnet] per layer."""
    h = block.resnets[0](h, emb)
    for j, resnet in enumerate(block.resnets[1:]):
        h = _resnet(block, resnet, _attend(block, j, h, text, image), emb)
    return h


def up_block(block: nn.Module, h, skips: tuple, emb, text, image, upsample_size=None):
    """One up block; ``skips`` are consumed from the end (the last skip is concatenated first)."""
    if not has_cross_attention(block):
        return block(h, skips, emb, upsample_size)
    for j, resnet in enumerate(block.resnets):
        h = torch.cat([h, skips[-1]], dim=1)
        skips = skips[:-1]
        h = _attend(block, j, _resnet(block, resnet, h, emb), text, image)
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            h = upsampler(h, upsample_size)
    return h


def time_embedding(model: nn.Module, sample: torch.Tensor, timestep) -> torch.Tensor:
    """``time_embedding(time_proj(t))`` for every sample; ``timestep`` is a number, a scalar
    tensor or one per sample. Sinusoids are computed in float32, then cast to the sample dtype."""
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t
    return model.time_embedding(model.time_proj(t).to(sample.dtype))


def encoder(model: nn.Module, h: torch.Tensor, emb, text, image):
    """``(skips, mid)`` of the down path + mid block of a UNet or ControlNet from the conv_in
    output ``h``: the skips are ``h`` and every down layer and downsampler output."""
    skips = (h,)
    for block in model.down_blocks:
        h, states = down_block(block, h, emb, text, image)
        skips += states
    return skips, mid_block(model.mid_block, h, emb, text, image)
