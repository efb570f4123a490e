"""Network definitions, key-compatible with the official releases.

The VQ-f4 helpers need diffusers, which is slow to import; they are loaded on first access.
"""

from distsr.models.checkpoint import load_official_state_dict
from distsr.models.resshift_unet import RESSHIFT_REALSR_X4_KWARGS, UNetModelSwin

_VQ_EXPORTS = (
    "VQ_F4_CONFIG",
    "build_vq_f4",
    "convert_official_vq",
    "vq_decode",
    "vq_encode",
    "vq_from_official",
)

__all__ = [
    "RESSHIFT_REALSR_X4_KWARGS",
    "UNetModelSwin",
    "load_official_state_dict",
    *_VQ_EXPORTS,
]


def __getattr__(name: str):
    if name in _VQ_EXPORTS:
        from distsr.models import vq

        return getattr(vq, name)
    raise AttributeError(f"module 'distsr.models' has no attribute {name!r}")
