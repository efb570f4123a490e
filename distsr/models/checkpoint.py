"""Strict loading of official checkpoint files (.pth / .pt / .ckpt / .safetensors).

Official releases wrap their weights in different ways (``{"state_dict": ...}`` for ResShift and
Lightning, ``{"params": ...}`` for BasicSR, ``{"model": ...}``) and may carry ``module.``
(DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefixes. This module unwraps all of them,
applies an optional key converter, and loads with strict key matching; on a mismatch the error
names the file and the missing / unexpected / mis-shaped keys.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "params", "model", "module")
_LIST_LIMIT = 10


def read_checkpoint(
    path: str | PathLike, *, trust_pickle: bool = False, opt_in: str = "trust_pickle=True"
) -> Mapping:
    """Read a checkpoint file onto the CPU; pickles are read with ``weights_only=True`` unless
    ``trust_pickle`` (set it only for files you trust that hold more than tensors and plain
    containers: unpickling them can run code).

    When torch refuses a file, the ValueError names the file, what torch refused and ``opt_in``:
    how to allow it (a caller with a config key names the key, e.g. ``ram.trust_pickle``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if trust_pickle:  # not a refusal: the pickle itself is broken
            raise
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refused it ({_refusal(err)}): it holds "
            f"pickled objects other than tensors. If you trust this file, set {opt_in}"
        ) from err


def _refusal(err: Exception) -> str:
    """torch's reason, e.g. "Unsupported global: GLOBAL argparse.Namespace was not an allowed
    global by default" (its message also explains the options; the first line stands in for a
    message of another shape)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", text)
    if found:
        return found.group(1).strip()
    return (text.strip().splitlines() or [type(err).__name__])[0]


def unwrap_state_dict(ckpt: Mapping, wrapper_key: str | None = None) -> dict[str, torch.Tensor]:
    """Peel ``state_dict`` / ``params`` / ``model`` / ``module`` wrappers (or ``wrapper_key``) off.

    A pickled whole module (only readable with ``trust_pickle``) yields its own state_dict.
    """
    if isinstance(ckpt, nn.Module):
        return dict(ckpt.state_dict())
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, not a dict of tensors")
    if wrapper_key is not None:
        if wrapper_key not in ckpt:
            raise ValueError(
                f"checkpoint has no {wrapper_key!r} entry; top keys: {list(ckpt)[:10]}"
            )
        ckpt = ckpt[wrapper_key]
    while True:
        inner = next((k for k in WRAPPER_KEYS if isinstance(ckpt.get(k), Mapping)), None)
        if inner is None:
            break
        ckpt = ckpt[inner]
    return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading ``module.`` (DDP) and any ``_orig_mod.`` (torch.compile) from every key."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Return a description of every key / shape mismatch ('' when the dict fits the model)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} file {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    report = ""
    if strict and missing:
        report += _listing("missing keys", missing)
    if strict and unexpected:
        report += _listing("unexpected keys", unexpected)
    if shapes:
        report += _listing("shape mismatches", shapes)
    return report


def load_official_state_dict(
    path: str | PathLike,
    model: nn.Module,
    *,
    converter: Callable[[dict], dict] | None = None,
    strict: bool = True,
    wrapper_key: str | None = None,
    trust_pickle: bool = False,
    model_name: str | None = None,
) -> nn.Module:
    """Load an official checkpoint into ``model`` in place (strict by default) and return it.

    Raises FileNotFoundError naming the path and the model that expected it, and ValueError
    naming the path plus the missing / unexpected keys and shape mismatches.
    """
    path = Path(path)
    name = model_name or type(model).__name__
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint for {name} not found: {path} (download the official weights there, "
            "or point the config at the right file)"
        )
    state_dict = strip_prefixes(
        unwrap_state_dict(read_checkpoint(path, trust_pickle=trust_pickle), wrapper_key)
    )
    if converter is not None:
        state_dict = converter(state_dict)
    report = check_state_dict(model, state_dict, strict)
    if report:
        raise ValueError(f"checkpoint {path} does not fit {name}:{report}")
    model.load_state_dict(state_dict, strict=strict)
    return model
