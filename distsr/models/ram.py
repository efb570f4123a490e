"""RAM (Recognize Anything, Zhang et al. 2023) as SeeSR uses it: tags and image embeddings.

SeeSR (Wu et al., CVPR 2024) conditions its UNet and ControlNet on RAM's image embeddings
[B, 145, 512] and its prompt on RAM's tags; its DAPE module is RAM with LoRA on the Swin-L qkv
(q and v) and on the tagging head's cross-attention query/key, merged before inference.

* Visual encoder: timm ``swin_large_patch4_window12_384`` (no classifier). RAM's 145 tokens are
  the mean of the 144 normalised tokens (its "CLS") followed by the tokens in row-major order.
* ``image_embeds = image_proj(tokens)``: one Linear on all 145 tokens, no normalisation.
* Tagging head: label queries ``h0 = relu(wordvec_proj(label_embed))`` [K, 768], then 2 layers of
  cross-attention only (queries from the labels, keys/values from image_embeds, 4 heads) + FFN,
  each followed by residual + LayerNorm (eps 1e-12) as in BERT; ``logits = fc(h)`` [B, K].
* Tags: class k fires when ``sigmoid(logit_k) > threshold_k`` (strictly); names of the firing
  classes are joined with ", " in class order ('' when none fires).

Module names equal the official ones (``visual_encoder.*``, ``tagging_head.encoder.layer.*``,
``label_embed``, ``wordvec_proj``, ``fc``, ``image_proj``) except that timm places each Swin
PatchMerging at the start of the next stage; ``distsr.models.ram_convert`` maps the official
files (RAM checkpoint + DAPE LoRA) onto this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distsr.config import missing_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RAMConfig:
    """Sizes of RAM (defaults: the released Swin-L @384 model, 4585 classes) and its input rule.

    ``antialias``: SeeSR resizes the lq tensor to ``image_size``² with torchvision's bilinear
    tensor resize; under the torchvision it pins (0.15) that resize does not antialias, newer
    torchvision does. It only matters when lq is larger than ``image_size``.
    """

    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    embed_width: int = 512  # image_proj output, label_embed width, tagging-head K/V input
    hidden_size: int = 768
    num_attention_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    num_classes: int = 4585
    lora_alpha: float = 1.0  # loralib scaling = lora_alpha / r (r read from the LoRA tensors)
    antialias: bool = False

    @property
    def visual_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """1 mean token + the final Swin grid."""
        grid = self.image_size // self.patch_size // 2 ** (len(self.depths) - 1)
        return 1 + grid * grid


# The sizes of the parity fixture built from the official classes (a laptop-size RAM).
TINY_RAM = RAMConfig(
    image_size=32,
    embed_dim=32,
    depths=(2, 2),
    num_heads=(2, 4),
    window_size=4,
    embed_width=48,
    hidden_size=64,
    num_layers=1,
    intermediate_size=128,
    num_classes=10,
)


# how a config allows RAM / DAPE files that need full unpickling (``RAMWeights.trust_pickle``)
TRUST_PICKLE_KEY = (
    "ram.trust_pickle: true in the SeeSR teacher config (e.g. method.teacher.ram.trust_pickle=true)"
)


@dataclass
class RAMWeights:
    """Where the official files are: the RAM checkpoint (``ram_swin_large_14m.pth``), SeeSR's
    DAPE LoRA (``DAPE.pth``, optional: without it RAM runs plain) and the tag data
    (``ram_tag_list.txt``: one name per line; ``ram_tag_list_threshold.txt``: one float per
    line; both from the recognize-anything ``ram/data`` folder). The two checkpoints are read with
    torch's weights_only load; ``trust_pickle: true`` lets through files it refuses."""

    checkpoint: str | None = None
    dape: str | None = None
    tag_list: str | None = None
    tag_thresholds: str | None = None
    # true: read checkpoint and dape with full unpickling (code in the file can run), for files
    # you trust that torch's weights_only load refuses (pickled objects besides the weights)
    trust_pickle: bool = False

    def validate(self) -> list[tuple[str, str]]:
        return [
            *missing_file("checkpoint", self.checkpoint, "RAM checkpoint (ram_swin_large_14m.pth)"),
            *missing_file("dape", self.dape, "DAPE LoRA weights (DAPE.pth)"),
            *missing_file("tag_list", self.tag_list, "RAM tag names (ram_tag_list.txt)"),
            *missing_file(
                "tag_thresholds",
                self.tag_thresholds,
                "RAM class thresholds (ram_tag_list_threshold.txt)",
            ),
        ]


class TagVocabulary(NamedTuple):
    """Class names (index k = line k) and per-class thresholds of the tag decision."""

    names: tuple[str, ...]
    thresholds: torch.Tensor  # [K] float32

    @classmethod
    def from_files(cls, names_path: str | PathLike, thresholds_path: str | PathLike):
        names = Path(names_path).read_text(encoding="utf-8").splitlines()
        values = Path(thresholds_path).read_text(encoding="utf-8").split()
        if len(names) != len(values):
            raise ValueError(
                f"{names_path} has {len(names)} tag names but {thresholds_path} has "
                f"{len(values)} thresholds; they must be the matching RAM data files"
            )
        return cls(tuple(names), torch.tensor([float(v) for v in values], dtype=torch.float32))

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, K] bool: sigmoid(logits) > threshold, in float32."""
        return torch.sigmoid(logits.float()) > self.thresholds.to(logits.device)

    def strings(self, logits: torch.Tensor) -> list[str]:
        """One ", "-joined tag string per batch element, classes in index order."""
        if logits.shape[-1] != len(self.names):
            raise ValueError(f"{logits.shape[-1]} logits for {len(self.names)} tag names")
        return [
            ", ".join(self.names[k] for k in row.nonzero().flatten().tolist())
            for row in self.targets(logits)
        ]


class RAMOutput(NamedTuple):
    features: torch.Tensor  # [B, 1 + N, visual_width]: mean token + Swin tokens
    image_embeds: torch.Tensor  # [B, 1 + N, embed_width]: what SeeSR's image attentions read
    logits: torch.Tensor  # [B, num_classes]


# ---- tagging head (BERT names, cross-attention only) -----------------------------------------
class _CrossAttentionSelf(nn.Module):
    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.embed_width, cfg.hidden_size)
        self.value = nn.Linear(cfg.embed_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, h: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        q = self._split(self.query(h))
        k, v = self._split(self.key(image_embeds)), self._split(self.value(image_embeds))
        # softmax(q k^T / sqrt(d_head)) v over all image tokens (the all-ones mask adds 0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)


class _DenseLayerNorm(nn.Module):
    """BERT's ``*Output``: LayerNorm(dense(x) + residual)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)  # noqa: N815 (official name)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.self = _CrossAttentionSelf(cfg)
        self.output = _DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h, image_embeds), h)


class _Intermediate(nn.Module):
    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU


class _TaggingLayer(nn.Module):
    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.crossattention = _CrossAttention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        a = self.crossattention(h, image_embeds)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.layer = nn.ModuleList(_TaggingLayer(cfg) for _ in range(cfg.num_layers))


class TaggingHead(nn.Module):
    """RAM's query-to-label head: BERT layers with their self-attention and embeddings removed."""

    def __init__(self, cfg: RAMConfig):
        super().__init__()
        self.encoder = _Encoder(cfg)

    def forward(self, h: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            h = layer(h, image_embeds)
        return h


# ---- the model ---------------------------------------------------------------------------------
def build_swin(cfg: RAMConfig, device: torch.device | str | None = None) -> nn.Module:
    """timm's Swin with RAM's sizes and no classifier; nothing is downloaded."""
    import timm

    return timm.create_model(
        "swin_large_patch4_window12_384",
        pretrained=False,
        num_classes=0,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        device=device,
    )


class RAM(nn.Module):
    """RAM image encoder + tagging head; ``vocabulary`` (names, thresholds) turns logits into
    tag strings. Build with ``RAM.from_official`` to load the released files."""

    def __init__(self, cfg: RAMConfig | None = None, vocabulary: TagVocabulary | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RAMConfig()
        self.vocabulary = vocabulary
        self.label_embed = nn.Parameter(torch.zeros(cfg.num_classes, cfg.embed_width))
        self.visual_encoder = build_swin(cfg)
        self.tagging_head = TaggingHead(cfg)
        self.wordvec_proj = nn.Linear(cfg.embed_width, cfg.hidden_size)
        self.fc = nn.Linear(cfg.hidden_size, 1)
        self.image_proj = nn.Linear(cfg.visual_width, cfg.embed_width)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_official(
        cls,
        ram_path: str | PathLike,
        dape_path: str | PathLike | None = None,
        config: RAMConfig | None = None,
        *,
        vocabulary: TagVocabulary | None = None,
        trust_pickle: bool = False,
        opt_in: str = "trust_pickle=True",
    ) -> RAM:
        """Load the RAM checkpoint (and merge SeeSR's DAPE LoRA) strictly; eval mode, no grads.
        A file torch's weights_only load refuses is an error naming ``opt_in`` unless
        ``trust_pickle`` (``models.checkpoint.read_checkpoint``)."""
        from distsr.models.ram_convert import load_official_ram

        model = cls(config, vocabulary)
        load_official_ram(model, ram_path, dape_path, trust_pickle=trust_pickle, opt_in=opt_in)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_weights(cls, weights: RAMWeights, config: RAMConfig | None = None, **kw) -> RAM:
        """``from_official`` with the paths (and tag data, when given) of a ``RAMWeights``."""
        if not weights.checkpoint:
            raise ValueError("RAMWeights.checkpoint is not set (path to ram_swin_large_14m.pth)")
        vocabulary = None
        if weights.tag_list or weights.tag_thresholds:
            vocabulary = TagVocabulary.from_files(weights.tag_list, weights.tag_thresholds)
        return cls.from_official(
            weights.checkpoint,
            weights.dape,
            config,
            vocabulary=vocabulary,
            trust_pickle=weights.trust_pickle,
            opt_in=TRUST_PICKLE_KEY,
            **kw,
        )

    def preprocess(self, lq: torch.Tensor) -> torch.Tensor:
        """lq in [0, 1] of any size -> RAM input: bilinear resize to image_size² (aspect ratio
        not kept, align_corners=False), then ImageNet mean/std normalisation."""
        size = (self.cfg.image_size, self.cfg.image_size)
        x = F.interpolate(
            lq.float(),
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=self.cfg.antialias,
        )
        return ((x - self.pixel_mean) / self.pixel_std).to(self.image_proj.weight.dtype)

    def visual_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, C]: the mean of the normalised Swin tokens, then the tokens (row-major)."""
        tokens = self.visual_encoder.forward_features(image).flatten(1, 2)  # NHWC -> [B, N, C]
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def label_queries(self) -> torch.Tensor:
        """h0 = relu(wordvec_proj(label_embed)) [K, hidden]: no LayerNorm, no positions."""
        return F.relu(self.wordvec_proj(self.label_embed))

    def tag_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        h0 = self.label_queries().expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(h0, image_embeds)).squeeze(-1)

    def forward(self, image: torch.Tensor) -> RAMOutput:
        """``image``: normalised [B, 3, image_size, image_size] (see ``preprocess``)."""
        features = self.visual_features(image)
        image_embeds = self.image_proj(features)
        return RAMOutput(features, image_embeds, self.tag_logits(image_embeds))

    def tags(self, logits: torch.Tensor) -> list[str]:
        if self.vocabulary is None:
            raise ValueError(
                "this RAM has no tag vocabulary; pass vocabulary=TagVocabulary.from_files("
                "'ram_tag_list.txt', 'ram_tag_list_threshold.txt')"
            )
        return self.vocabulary.strings(logits)

    @torch.no_grad()
    def tag_and_embed(self, lq: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """What SeeSR's ``prepare`` needs from lq in [0, 1] (the LR input as given, before any
        upscaling): one tag string per image and image_embeds [B, 1 + N, embed_width]."""
        out = self(self.preprocess(lq))
        return self.tags(out.logits), out.image_embeds
