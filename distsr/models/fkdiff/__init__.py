"""FKdiff (paper 000; METHODS.md §5): compact-prior extractors, the teacher restorer, the FASRer
students, and the diffusion on the compact prior. Plain PyTorch."""

from distsr.models.fkdiff.cfe import CFE
from distsr.models.fkdiff.config import (
    CFE_PAPER,
    CFE_TINY,
    FASRER_L,
    FASRER_L_TINY,
    FASRER_S,
    FASRER_S_TINY,
    PRIOR_PAPER,
    PRIOR_TINY,
    TEACHER_PAPER,
    TEACHER_TINY,
    CFEConfig,
    FASRerConfig,
    FKdiffNetConfig,
    PriorConfig,
)
from distsr.models.fkdiff.fasrer import FASRer, fft_attention
from distsr.models.fkdiff.prior import PriorDenoiser, PriorSchedule
from distsr.models.fkdiff.restorer import FKdiffTeacherNet

__all__ = [
    "CFE", "CFEConfig", "CFE_PAPER", "CFE_TINY", "FASRer", "FASRerConfig", "FASRER_L",
    "FASRER_L_TINY", "FASRER_S", "FASRER_S_TINY", "FKdiffNetConfig", "FKdiffTeacherNet",
    "PRIOR_PAPER", "PRIOR_TINY", "PriorConfig", "PriorDenoiser", "PriorSchedule", "TEACHER_PAPER",
    "TEACHER_TINY", "fft_attention",
]  # fmt: skip
