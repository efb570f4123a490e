"""Fresh (randomly initialised) SR students by name, with the official key names, so that an
exported ``state_dict`` loads in the official code and back through ``load_sr``.

Presets follow conformance/sr README §1-2 and METHODS.md §3-4: SwinIR lightweight (= the
"SwinIR-small" student of DTKD, 60 channels, 4 groups of 6), classical and real-world; EDSR
baseline (64/16) and EDSR (256/32, res_scale 0.1); RCAN (10 groups x 20 RCAB) and the MTKD
student RCAN-light (10 groups x 6); SRMD / SRMDNF; RRDBNet and SRVGGNetCompact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from distsr.config import missing_file
from distsr.models.sr.nets import EDSR, SRMD

_SWIN_LIGHT = {"embed_dim": 60, "depths": [6] * 4, "num_heads": [6] * 4,
               "upsampler": "pixelshuffledirect"}  # fmt: skip
_SWIN_CLASSICAL = {"embed_dim": 180, "depths": [6] * 6, "num_heads": [6] * 6,
                   "upsampler": "pixelshuffle"}  # fmt: skip
_SWIN_COMMON = {"img_size": 64, "window_size": 8, "mlp_ratio": 2.0, "img_range": 1.0,
                "resi_connection": "1conv", "in_chans": 3}  # fmt: skip

PRESETS: dict[str, dict[str, dict]] = {
    "swinir": {
        "light": _SWIN_LIGHT,
        "small": _SWIN_LIGHT,
        "classical": _SWIN_CLASSICAL,
        "realworld_m": {**_SWIN_CLASSICAL, "upsampler": "nearest+conv"},
        "realworld_l": {"embed_dim": 240, "depths": [6] * 9, "num_heads": [8] * 9,
                        "upsampler": "nearest+conv", "resi_connection": "3conv"},
    },
    "edsr": {"baseline": {"num_feat": 64, "num_block": 16, "res_scale": 1.0},
             "large": {"num_feat": 256, "num_block": 32, "res_scale": 0.1}},
    "rcan": {"full": {"n_feats": 64, "n_resgroups": 10, "n_resblocks": 20, "reduction": 16},
             "light": {"n_feats": 64, "n_resgroups": 10, "n_resblocks": 6, "reduction": 16}},
    "srmd": {"srmd": {"in_nc": 19}, "srmdnf": {"in_nc": 18}},
    "rrdbnet": {"x4plus": {"num_filters": 64, "num_blocks": 23}},
    "srvgg": {"compact": {"num_feat": 64, "num_conv": 16}},
}  # fmt: skip
DEFAULT_PRESET = {"swinir": "light", "edsr": "baseline", "rcan": "light", "srmd": "srmdnf",
                  "rrdbnet": "x4plus", "srvgg": "compact"}  # fmt: skip


def _swinir(scale: int, **kw) -> nn.Module:
    from distsr.models.sr.spandrel_nets import SwinIR

    return SwinIR(**{**_SWIN_COMMON, "upscale": scale, **kw})


def _edsr(scale: int, **kw) -> nn.Module:
    return EDSR(**{"upscale": scale, **kw})


def _srmd(scale: int, **kw) -> nn.Module:
    return SRMD(**{"upscale": scale, **kw})


def _rcan(scale: int, **kw) -> nn.Module:
    from distsr.models.sr.spandrel_nets import RCAN

    return RCAN(**{"scale": scale, "rgb_range": 255, "norm": True, **kw}).freeze_meanshift()


def _rrdbnet(scale: int, **kw) -> nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(**{"scale": scale, **kw})


def _srvgg(scale: int, **kw) -> nn.Module:
    from spandrel.architectures.Compact import Compact

    return Compact(**{"upscale": scale, **kw})


BUILDERS = {
    "swinir": _swinir,
    "edsr": _edsr,
    "rcan": _rcan,
    "srmd": _srmd,
    "rrdbnet": _rrdbnet,
    "srvgg": _srvgg,
}


def build_sr(arch: str, preset: str | None = None, *, scale: int = 4, **kwargs) -> nn.Module:
    """A fresh ``arch`` network (``preset`` of PRESETS[arch], kwargs override it) at ``scale``."""
    arch = arch.lower()
    if arch not in BUILDERS:
        raise ValueError(f"unknown SR student {arch!r}; known: {sorted(BUILDERS)}")
    preset = preset or DEFAULT_PRESET[arch]
    if preset not in PRESETS[arch]:
        raise ValueError(f"unknown {arch} preset {preset!r}; known: {sorted(PRESETS[arch])}")
    return BUILDERS[arch](int(scale), **{**PRESETS[arch][preset], **kwargs})


@dataclass
class StudentConfig:
    """A fresh ``build_sr(arch, preset, scale=scale, **kwargs)``; ``checkpoint``: init weights
    (any file of that architecture, loaded strictly)."""

    arch: str = "swinir"
    preset: str | None = None  # None: the arch's default (models.sr.build.DEFAULT_PRESET)
    scale: int = 4
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None

    def validate(self) -> list[tuple[str, str]]:
        if self.arch.lower() not in BUILDERS:
            return [("arch", f"must be one of {sorted(BUILDERS)}, got {self.arch!r}")]
        presets = PRESETS[self.arch.lower()]
        problems = []
        if self.preset is not None and self.preset not in presets:
            problems.append(("preset", f"must be one of {sorted(presets)}, got {self.preset!r}"))
        if self.scale < 1:
            problems.append(("scale", f"must be >= 1, got {self.scale}"))
        return problems + missing_file("checkpoint", self.checkpoint, "student init weights")
