"""Key maps between BasicSR names and the original EDSR-PyTorch / RCAN names.

BasicSR's ``scripts/model_conversion/convert_models.py`` renames the original EDSR and RCAN
checkpoints for fixed block counts (32 blocks, 10 groups x 20 blocks); these rules work for any
count. The original names put the trunk conv after the last block (``body.{num_block}`` for EDSR,
``body.{num_group}`` for RCAN, ``body.g.body.{num_block}`` for an RCAN group tail) and may carry
``sub_mean`` / ``add_mean`` MeanShift 1x1 convs, which BasicSR computes without parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

MEANSHIFT_PREFIXES = ("sub_mean.", "add_mean.")
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def count_indices(keys, pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` in ``keys`` (0 when none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _common(key: str) -> str | None:
    """The names shared by EDSR and RCAN (head, upsampler, last conv); None for the rest."""
    if key.startswith("conv_first."):
        return "head.0." + key[len("conv_first.") :]
    if m := re.match(r"upsample\.(\d+)\.(.+)$", key):
        return f"tail.0.{m.group(1)}.{m.group(2)}"
    if key.startswith("conv_last."):
        return "tail.1." + key[len("conv_last.") :]
    return None


def edsr_basicsr_to_official(keys) -> dict[str, str]:
    """{BasicSR key: EDSR-PyTorch key} for every key of a BasicSR EDSR state_dict."""
    keys = list(keys)
    num_block = count_indices(keys, r"body\.(\d+)\.conv1\.")
    out = {}
    for key in keys:
        new = _common(key)
        if new is None and (m := re.match(r"body\.(\d+)\.conv([12])\.(.+)$", key)):
            new = f"body.{m.group(1)}.body.{0 if m.group(2) == '1' else 2}.{m.group(3)}"
        if new is None and key.startswith("conv_after_body."):
            new = f"body.{num_block}." + key[len("conv_after_body.") :]
        if new is None:
            raise ValueError(f"no EDSR-PyTorch name for BasicSR key {key!r}")
        out[key] = new
    return out


_RCAB_PARTS = {"0": "body.0", "2": "body.2", "3.attention.1": "body.3.conv_du.0",
               "3.attention.3": "body.3.conv_du.2"}  # fmt: skip


def rcan_basicsr_to_official(keys) -> dict[str, str]:
    """{BasicSR key: yulunzhang/RCAN key} for every key of a BasicSR RCAN state_dict."""
    keys = list(keys)
    num_group = count_indices(keys, r"body\.(\d+)\.residual_group\.")
    num_block = count_indices(keys, r"body\.0\.residual_group\.(\d+)\.")
    rcab = re.compile(r"body\.(\d+)\.residual_group\.(\d+)\.rcab\.(0|2|3\.attention\.[13])\.(.+)$")
    out = {}
    for key in keys:
        new = _common(key)
        if new is None and (m := rcab.match(key)):
            g, b, part, leaf = m.groups()
            new = f"body.{g}.body.{b}.{_RCAB_PARTS[part]}.{leaf}"
        if new is None and (m := re.match(r"body\.(\d+)\.conv\.(.+)$", key)):
            new = f"body.{m.group(1)}.body.{num_block}.{m.group(2)}"
        if new is None and key.startswith("conv_after_body."):
            new = f"body.{num_group}." + key[len("conv_after_body.") :]
        if new is None:
            raise ValueError(f"no original RCAN name for BasicSR key {key!r}")
        out[key] = new
    return out


def rename(state_dict: Mapping[str, torch.Tensor], keymap: Mapping[str, str]) -> dict:
    return {keymap[k]: v for k, v in state_dict.items()}


def invert(keymap: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in keymap.items()}


def meanshift_state(rgb_range: float = 255.0, rgb_mean=DIV2K_RGB_MEAN) -> dict[str, torch.Tensor]:
    """The ``sub_mean`` / ``add_mean`` parameters of the original code (std 1): identity 1x1
    convs with bias -/+ rgb_range * mean, so that ``x*rgb_range -> sub_mean`` equals BasicSR's
    ``(x - mean) * img_range``."""
    weight = torch.eye(3).view(3, 3, 1, 1)
    mean = torch.tensor(rgb_mean, dtype=torch.float32)
    return {"sub_mean.weight": weight.clone(), "sub_mean.bias": -1 * rgb_range * mean,
            "add_mean.weight": weight.clone(), "add_mean.bias": 1 * rgb_range * mean}  # fmt: skip


_EDSR_OFFICIAL = (
    (re.compile(r"head\.0\.(.+)$"), "conv_first.{0}"),
    (re.compile(r"body\.(\d+)\.body\.0\.(.+)$"), "body.{0}.conv1.{1}"),
    (re.compile(r"body\.(\d+)\.body\.2\.(.+)$"), "body.{0}.conv2.{1}"),
    (re.compile(r"body\.\d+\.(weight|bias)$"), "conv_after_body.{0}"),
    (re.compile(r"tail\.0\.(\d+)\.(.+)$"), "upsample.{0}.{1}"),
    (re.compile(r"tail\.1\.(.+)$"), "conv_last.{0}"),
)


def edsr_official_to_basicsr(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, float]:
    """An EDSR-PyTorch state_dict in BasicSR names, and the rgb_range its ``add_mean`` bias
    implies (255 when the file has no MeanShift)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(MEANSHIFT_PREFIXES):
            continue
        match = next(((m, fmt) for rx, fmt in _EDSR_OFFICIAL if (m := rx.match(key))), None)
        if match is None:
            raise ValueError(f"no BasicSR name for EDSR-PyTorch key {key!r}")
        out[match[1].format(*match[0].groups())] = value
    rgb_range = 255.0
    if "add_mean.bias" in state_dict:
        mean = torch.tensor(DIV2K_RGB_MEAN, dtype=torch.float64)
        rgb_range = round(float((state_dict["add_mean.bias"].double() / mean).mean()), 3)
    return out, rgb_range
