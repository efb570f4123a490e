"""Official RAM checkpoint + SeeSR DAPE LoRA -> ``distsr.models.ram.RAM``, strictly.

The RAM checkpoint (``ram_swin_large_14m.pth``, weights under ``"model"``) also holds the
``tag_encoder`` and ``text_decoder`` BERTs, which tags and embeddings never use: they are
skipped, as are the derived Swin buffers (``relative_position_index``, ``attn_mask``). Every
other key must match the model (names and shapes), and every key the model needs must be there.

DAPE (``DAPE.pth``) is a flat dict of loralib ``lora_A`` / ``lora_B`` tensors saved un-merged
(r = 8, alpha = 1, so scaling = 1/8). Merging follows loralib (Hu et al. 2021, W' = W + s B A):
* Swin ``attn.qkv`` is a MergedLinear with LoRA on q and v only: ``A = [A_q; A_v]`` [2r, dim],
  ``B = [B_q; B_v]`` [2 dim, r]; rows 0:dim gain s B_q A_q, rows 2dim:3dim gain s B_v A_v.
* Tagging-head cross-attention ``query`` / ``key``: W' = W + s B A.
The official model ties the tagging head's weights to ``tag_encoder`` layers 0-1, whose own LoRA
would be added to the same tensors; DAPE never trains those (they stay at B = 0), so only the
tagging-head LoRA is applied and a non-zero tied ``lora_B`` is refused.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path
from types import SimpleNamespace

import torch

from distsr.models.checkpoint import (
    check_state_dict,
    read_checkpoint,
    strip_prefixes,
    unwrap_state_dict,
)
from distsr.models.ram import RAM, RAMConfig

RAM_FILE = "the RAM checkpoint (recognize-anything ram_swin_large_14m.pth, or one of these sizes)"
DAPE_FILE = "SeeSR's DAPE LoRA weights (DAPE.pth: only lora_A / lora_B tensors)"
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
UNUSED_PREFIXES = ("tag_encoder.", "text_decoder.")  # RAM's text BERTs: not used for tags
LORA_RANK = 8  # loralib r in DAPE (SeeSR ram_lora)
_DOWNSAMPLE = re.compile(r"^visual_encoder\.layers\.(\d+)\.downsample\.")


def _shift_downsample(key: str, by: int) -> str:
    """RAM merges patches at the end of stage i, timm at the start of stage i + 1."""
    m = _DOWNSAMPLE.match(key)
    if m is None:
        return key
    return f"visual_encoder.layers.{int(m.group(1)) + by}.downsample.{key[m.end() :]}"


def to_official_key(key: str) -> str:
    return _shift_downsample(key, -1)


def from_official_key(key: str) -> str:
    return _shift_downsample(key, +1)


def official_state_dict(model: RAM) -> dict[str, torch.Tensor]:
    """The model's state dict under the official (base, LoRA-free) key names."""
    return {to_official_key(k): v for k, v in model.state_dict().items()}


def lora_targets(cfg: RAMConfig) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Official module names whose DAPE LoRA inference uses, with (lora_A, lora_B) shapes."""
    r = LORA_RANK
    targets = {}
    for i, depth in enumerate(cfg.depths):
        dim = cfg.embed_dim * 2**i
        for b in range(depth):
            targets[f"visual_encoder.layers.{i}.blocks.{b}.attn.qkv"] = ((2 * r, dim), (2 * dim, r))
    for i in range(cfg.num_layers):
        attn = f"tagging_head.encoder.layer.{i}.crossattention.self"
        targets[f"{attn}.query"] = ((r, cfg.hidden_size), (cfg.hidden_size, r))
        targets[f"{attn}.key"] = ((r, cfg.embed_width), (cfg.hidden_size, r))
    return targets


# ---- reading -----------------------------------------------------------------------------------
def _read(path: str | PathLike, what: str, trust_pickle: bool, opt_in: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle, opt_in=opt_in)
    sd = strip_prefixes(unwrap_state_dict(ckpt))
    # the official loader renames an older head name
    return {k.replace("vision_multi.", "tagging_head.", 1): v for k, v in sd.items()}


def _is_lora(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def _base_weights(sd: dict[str, torch.Tensor], model: RAM, path, what: str) -> dict:
    """The keys the model needs (official names), checked strictly against the file."""
    kept = {
        k: v
        for k, v in sd.items()
        if not _is_lora(k)
        and not k.startswith(UNUSED_PREFIXES)
        and k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS
    }
    report = check_state_dict(_as_model(official_state_dict(model)), kept)
    if report:
        raise ValueError(f"{path} does not fit RAM (expected {what}):{report}")
    return kept


def _as_model(expected: dict[str, torch.Tensor]) -> SimpleNamespace:
    """What ``check_state_dict`` reads of a model (its ``state_dict()``), for official names."""
    return SimpleNamespace(state_dict=lambda: expected)


def _lora(sd: dict[str, torch.Tensor], cfg: RAMConfig, path, what: str, required: bool) -> dict:
    """The LoRA tensors inference uses; unused tag_encoder/text_decoder LoRA is dropped once the
    tied-weight rule is checked. ``required``: every used tensor must be there (DAPE files)."""
    lora = {k: v for k, v in sd.items() if _is_lora(k)}
    _check_tied_lora(lora, cfg, path)
    lora = {k: v for k, v in lora.items() if not k.startswith(UNUSED_PREFIXES)}
    wanted = {
        f"{module}.lora_{ab}": torch.empty(shape, device="meta")
        for module, shapes in lora_targets(cfg).items()
        for ab, shape in zip("AB", shapes)
        if required or f"{module}.lora_{ab}" in lora
    }
    report = check_state_dict(_as_model(wanted), lora)
    if report:
        raise ValueError(f"{path} does not fit RAM's LoRA (expected {what}):{report}")
    return lora


def _check_tied_lora(lora: dict[str, torch.Tensor], cfg: RAMConfig, path) -> None:
    for i in range(cfg.num_layers):
        for name in ("query", "key"):
            key = f"tag_encoder.encoder.layer.{i}.crossattention.self.{name}.lora_B"
            if key in lora and bool(lora[key].any()):
                raise ValueError(
                    f"{path}: {key} is non-zero. The official model would add this LoRA to the "
                    "tagging-head weight it shares with tag_encoder; DAPE never trains it, and "
                    "this loader applies the tagging-head LoRA only."
                )


# ---- merging -----------------------------------------------------------------------------------
def merge_lora(base: dict, lora: dict, cfg: RAMConfig) -> dict:
    """W' = W + (alpha / r) B A for every target with both LoRA tensors (loralib's eval merge)."""
    merged = dict(base)
    for module in lora_targets(cfg):
        a, b = lora.get(f"{module}.lora_A"), lora.get(f"{module}.lora_B")
        if a is None and b is None:
            continue  # no LoRA given: plain RAM
        if a is None or b is None:
            raise ValueError(f"{module}: lora_A and lora_B must be given together")
        key = f"{module}.weight"
        w = merged[key]
        if module.endswith(".qkv"):  # MergedLinear, enable_lora = [q, k, v] = [True, False, True]
            dim, r = w.shape[1], a.shape[0] // 2
            s = cfg.lora_alpha / r
            w = w.clone()
            w[:dim] += (b[:dim] @ a[:r]) * s
            w[2 * dim :] += (b[dim:] @ a[r:]) * s
        else:
            w = w + (b @ a) * (cfg.lora_alpha / a.shape[0])
        merged[key] = w
    return merged


def load_official_ram(
    model: RAM,
    ram_path: str | PathLike,
    dape_path: str | PathLike | None = None,
    *,
    trust_pickle: bool = False,
    opt_in: str = "trust_pickle=True",
) -> RAM:
    """Load RAM (+ DAPE) into ``model`` in place: strict keys and shapes, LoRA merged. Both
    files go through ``read_checkpoint`` (weights_only unless ``trust_pickle``; a refusal names
    ``opt_in``, how to allow it).

    As in SeeSR, LoRA tensors in the RAM file (if any) are overridden by those of DAPE.
    """
    sd = _read(ram_path, RAM_FILE, trust_pickle, opt_in)
    base = _base_weights(sd, model, ram_path, RAM_FILE)
    lora = _lora(sd, model.cfg, ram_path, RAM_FILE, required=False)
    if dape_path is not None:
        dape = _read(dape_path, DAPE_FILE, trust_pickle, opt_in)
        not_lora = [k for k in dape if not _is_lora(k)]
        if not_lora:
            raise ValueError(
                f"{dape_path} does not fit RAM's LoRA (expected {DAPE_FILE}):\n"
                f"  unexpected keys ({len(not_lora)}): {', '.join(not_lora[:10])}"
            )
        lora.update(_lora(dape, model.cfg, dape_path, DAPE_FILE, required=True))
    merged = merge_lora(base, lora, model.cfg)
    model.load_state_dict({from_official_key(k): v for k, v in merged.items()}, strict=True)
    return model
