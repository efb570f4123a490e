"""Any SR model file -> a plain ``nn.Module`` ``net(lq in [0, 1]) -> sr``, its architecture
detected from the keys.

Detection tries, in order, the networks we define (EDSR with BasicSR or EDSR-PyTorch names,
SRMD), RCAN with BasicSR names (renamed onto spandrel's original RCAN names, MeanShift added),
then every architecture spandrel knows (SwinIR, RCAN, RRDBNet/ESRGAN, SRVGGNetCompact, HAT,
DAT, SPAN, OmniSR, ...). Weights load strictly: a file that does not fit the detected
architecture raises an error naming the missing and unexpected keys; a file no detector
accepts raises one error naming everything that was tried.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from distsr.models.checkpoint import check_state_dict, read_checkpoint, strip_prefixes
from distsr.models.sr import keymaps
from distsr.models.sr.nets import EDSR, SRMD
from distsr.models.swin import relative_position_index

# the official wrappers, EMA first (main_test_swinir.py reads params_ema for real-world SR)
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net", "module")
SWINIR_DEFAULT_IMG_SIZE = 64  # official default; sets the attn_mask shape when a file has none


@dataclass
class LoadedSR:
    """A loaded SR network, the architecture it was detected as and its scale factor."""

    net: nn.Module
    arch: str
    scale: int


def read_sr_state_dict(path_or_state, wrapper_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict of a file or dict: ``params_ema`` / ``params`` / ... unwrapped,
    ``module.`` and ``_orig_mod.`` prefixes stripped."""
    ckpt = path_or_state
    if isinstance(path_or_state, str | PathLike):
        if not Path(path_or_state).is_file():
            raise FileNotFoundError(f"SR model file not found: {path_or_state}")
        ckpt = read_checkpoint(path_or_state)
    if isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    if wrapper_key is not None:
        if wrapper_key not in ckpt:
            raise ValueError(f"no {wrapper_key!r} entry; top-level keys: {list(ckpt)[:10]}")
        ckpt = ckpt[wrapper_key]
    while inner := next((k for k in WRAPPER_KEYS if isinstance(ckpt.get(k), Mapping)), None):
        ckpt = ckpt[inner]
    return strip_prefixes({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})


def load_strict(net: nn.Module, state_dict: Mapping, what: str) -> nn.Module:
    report = check_state_dict(net, state_dict)
    if report:
        raise ValueError(f"{what} does not fit {type(net).__name__}:{report}")
    net.load_state_dict(state_dict)
    return net.eval()


# ---- our own architectures ------------------------------------------------------------------
def _has(sd: Mapping, *keys: str) -> bool:
    return all(k in sd for k in keys)


def _edsr_scale(sd: Mapping, prefix: str, num_feat: int) -> int:
    convs = keymaps.count_indices(sd, prefix + r"(\d+)\.weight") // 2 + 1
    return 3 if sd[f"{prefix}0.weight"].shape[0] == 9 * num_feat else 2**convs


def _build_edsr(sd: dict, what: str, **overrides) -> LoadedSR:
    rgb_range = None
    if "head.0.weight" in sd:  # EDSR-PyTorch names
        sd, rgb_range = keymaps.edsr_official_to_basicsr(sd)
    num_feat, num_in_ch = sd["conv_first.weight"].shape[:2]
    kwargs = {"num_in_ch": num_in_ch, "num_out_ch": sd["conv_last.weight"].shape[0],
              "num_feat": num_feat,
              "num_block": keymaps.count_indices(sd, r"body\.(\d+)\.conv1\."),
              "upscale": _edsr_scale(sd, "upsample.", num_feat),
              # EDSR (256/32) used res_scale 0.1, the baseline 1 (not in the file)
              "res_scale": 0.1 if num_feat == 256 else 1.0}  # fmt: skip
    if rgb_range is not None:
        kwargs["img_range"] = rgb_range
    kwargs.update(overrides)
    net = load_strict(EDSR(**kwargs), sd, what)
    return LoadedSR(net, "EDSR", kwargs["upscale"])


def _is_srmd(sd: Mapping) -> bool:
    if not all(re.fullmatch(r"model\.\d+\.(weight|bias)", k) for k in sd) or not sd:
        return False
    first = sd.get("model.0.weight")
    return first is not None and first.ndim == 4 and first.shape[1] in (18, 19)


def _build_srmd(sd: dict, what: str, **overrides) -> LoadedSR:
    last = keymaps.count_indices(sd, r"model\.(\d+)\.weight") - 1
    out_nc = 3
    upscale = math.isqrt(sd[f"model.{last}.weight"].shape[0] // out_nc)
    kwargs = {
        "in_nc": sd["model.0.weight"].shape[1],
        "out_nc": out_nc,
        "nc": sd["model.0.weight"].shape[0],
        "nb": last // 2 + 1,
        "upscale": upscale,
    }
    kwargs.update(overrides)
    net = load_strict(SRMD(**kwargs), sd, what)
    return LoadedSR(net, "SRMD", kwargs["upscale"])


def _build_rcan_basicsr(sd: dict, what: str, **overrides) -> LoadedSR:
    """BasicSR RCAN -> original names; BasicSR's (x - mean) * 255 becomes the MeanShift convs."""
    img_range = overrides.pop("img_range", 255.0)
    if overrides:
        raise ValueError(f"RCAN takes only the img_range override, got {sorted(overrides)}")
    sd = keymaps.rename(sd, keymaps.rcan_basicsr_to_official(sd))
    sd.update(keymaps.meanshift_state(img_range))
    loaded = _load_spandrel(sd, what, arch="RCAN")
    loaded.arch = "RCAN"
    return loaded


OWN_ARCHS: dict[str, tuple[Callable[[Mapping], bool], Callable[..., LoadedSR]]] = {
    "EDSR": (lambda sd: _has(sd, "conv_first.weight", "body.0.conv1.weight",
                             "conv_after_body.weight", "upsample.0.weight"), _build_edsr),
    "EDSR (EDSR-PyTorch names)": (
        lambda sd: _has(sd, "head.0.weight", "body.0.body.0.weight", "tail.1.weight")
        and "body.0.body.0.body.0.weight" not in sd, _build_edsr),
    "SRMD": (_is_srmd, _build_srmd),
    "RCAN (BasicSR names)": (
        lambda sd: _has(sd, "conv_first.weight", "body.0.residual_group.0.rcab.0.weight"),
        _build_rcan_basicsr),
}  # fmt: skip


# ---- spandrel -------------------------------------------------------------------------------
def _registry():
    from spandrel import MAIN_REGISTRY

    return MAIN_REGISTRY


def swin_shift_mask(size: int, window_size: int) -> torch.Tensor:
    """The standard Swin shifted-window mask at img_size ``size`` (shift ws//2): 0 within a
    region, -100 across; float32 [nW, ws^2, ws^2] (conformance/sr README §1)."""
    ws, shift = window_size, window_size // 2
    label = torch.zeros(size, size)
    bands = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            label[rows, cols] = 3 * i + j
    n = size // ws
    windows = label.view(n, ws, n, ws).permute(0, 2, 1, 3).reshape(n * n, ws * ws)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.where(differ, -100.0, 0.0)


def fill_swinir_buffers(sd: dict) -> dict:
    """Add the SwinIR buffers a file may lack (re-saved without buffers): every block's
    ``relative_position_index`` and the shifted (odd) blocks' ``attn_mask`` at img_size 64.
    Only for SwinIR: other Swin-based networks (HAT, DAT, ...) keep their own buffer rules."""
    tables = [k for k in sd if k.endswith(".attn.relative_position_bias_table")]
    if not tables or not any(".residual_group.blocks." in k for k in tables):
        return sd
    ws = (math.isqrt(sd[tables[0]].shape[0]) + 1) // 2  # the table has (2ws - 1)^2 rows
    sd = dict(sd)
    for table in tables:
        block = table[: -len(".attn.relative_position_bias_table")]
        sd.setdefault(f"{block}.attn.relative_position_index", relative_position_index(ws))
        if int(block.rsplit(".", 1)[1]) % 2 and ws < SWINIR_DEFAULT_IMG_SIZE:
            sd.setdefault(f"{block}.attn_mask", swin_shift_mask(SWINIR_DEFAULT_IMG_SIZE, ws))
    return sd


def _detect(registry, sd: Mapping):
    return next((s for s in registry.architectures("detection") if s.detect(sd)), None)


def _load_spandrel(sd: dict, what: str, arch: str | None = None) -> LoadedSR:
    from spandrel import ImageModelDescriptor

    from distsr.models.sr.spandrel_nets import adopt

    registry = _registry()
    if arch is None:
        support = _detect(registry, sd)
        if support is None:  # perhaps a SwinIR saved without its buffers
            support = _detect(registry, fill_swinir_buffers(sd))
            if support is None or support.architecture.id != "SwinIR":
                return None
    else:
        support = registry.get(arch)
    if support.architecture.id == "SwinIR":
        sd = fill_swinir_buffers(sd)
    name = support.architecture.id
    try:
        desc = support.architecture.load(dict(sd))
    except (RuntimeError, KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{what} looks like {name} (spandrel) but does not fit it: "
                         f"{type(err).__name__}: {err}") from err  # fmt: skip
    if not isinstance(desc, ImageModelDescriptor):
        raise ValueError(f"{what} is a {name} model ({type(desc).__name__}), "
                         "not an image-to-image SR network")  # fmt: skip
    return LoadedSR(adopt(desc.model.eval()), name, int(desc.scale))


def _build_own(name: str, sd: dict, what: str, overrides: dict) -> LoadedSR:
    try:
        return OWN_ARCHS[name][1](sd, what, **overrides)
    except (KeyError, IndexError) as err:  # a key the hyper-parameters are read from
        raise ValueError(f"{what} does not fit {name}: it has no key {err}") from err


def known_archs() -> list[str]:
    return list(OWN_ARCHS) + [s.architecture.id for s in _registry().architectures("detection")]


def load_sr(
    path_or_state,
    *,
    arch: str | None = None,
    scale: int | None = None,
    pad: str = "reflect",
    wrapper_key: str | None = None,
    **overrides,
) -> LoadedSR:
    """Load any SR model file (or state_dict) as a network in eval mode.

    ``arch`` forces an architecture (a name of ``known_archs()``) instead of detecting it;
    ``scale`` checks the detected scale; ``pad`` is SwinIR's padding ("reflect": the network's
    own, "testscript": main_test_swinir.py's mirror pad); ``overrides`` set constructor
    arguments a file cannot tell for our own networks (EDSR ``res_scale``, ``img_range``).
    """
    from distsr.models.sr.spandrel_nets import PAD_MODES, SwinIR

    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    what = str(path_or_state) if isinstance(path_or_state, str | PathLike) else "the state_dict"
    sd = read_sr_state_dict(path_or_state, wrapper_key)
    if arch in OWN_ARCHS:
        loaded = _build_own(arch, sd, what, overrides)
    elif arch is None:
        name = next((n for n, (detect, _) in OWN_ARCHS.items() if detect(sd)), None)
        loaded = None if name is None else _build_own(name, sd, what, overrides)
    else:
        loaded = None
    if loaded is None:
        if arch is not None and arch not in known_archs():
            raise ValueError(f"unknown SR architecture {arch!r}; known: {known_archs()}")
        if overrides:
            raise ValueError(f"constructor overrides {sorted(overrides)} apply only to "
                             f"{sorted(OWN_ARCHS)}")  # fmt: skip
        loaded = _load_spandrel(sd, what, arch)
    if loaded is None:
        raise ValueError(
            f"{what}: no known SR architecture matches its {len(sd)} keys "
            f"(first: {list(sd)[:5]}); tried, in order: {', '.join(known_archs())}"
        )
    if scale is not None and int(scale) != loaded.scale:
        raise ValueError(f"{what} is a x{loaded.scale} {loaded.arch}, expected x{scale}")
    if isinstance(loaded.net, SwinIR):
        loaded.net.pad_mode = pad
    return loaded


def load_sr_model(
    path_or_state, *, arch: str | None = None, scale: int | None = None, **kwargs
) -> nn.Module:
    """``load_sr(...).net``: any SR model file -> ``net(lq in [0, 1]) -> sr``."""
    return load_sr(path_or_state, arch=arch, scale=scale, **kwargs).net
