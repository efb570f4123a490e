"""Diffusion processes and samplers (ResShift residual shifting; SD/DDPM via diffusers)."""

from distsr.diffusion.resshift import DenoiseFn, ResShiftDiffusion
from distsr.diffusion.schedule import (
    REALSR_V1,
    REALSR_V3,
    ScheduleConfig,
    exponential_sqrt_etas,
)

__all__ = [
    "REALSR_V1",
    "REALSR_V3",
    "DenoiseFn",
    "ResShiftDiffusion",
    "ScheduleConfig",
    "exponential_sqrt_etas",
]
