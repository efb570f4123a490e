"""Single-pass SR networks (teachers and students of DTKD / MTKD, METHODS.md §3-4).

``load_sr`` / ``load_sr_model`` load any SR model file with its architecture detected from the
keys (spandrel for what it has, our own EDSR and SRMD for what it lacks); ``build_sr`` makes a
fresh student with the official key names. spandrel is imported on first use.
"""

from distsr.models.sr.build import PRESETS, build_sr
from distsr.models.sr.loader import LoadedSR, known_archs, load_sr, load_sr_model
from distsr.models.sr.nets import EDSR, SRMD

__all__ = ["EDSR", "PRESETS", "SRMD", "LoadedSR", "build_sr", "known_archs", "load_sr",
           "load_sr_model"]  # fmt: skip
