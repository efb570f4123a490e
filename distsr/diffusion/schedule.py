"""The ResShift eta schedule (README §2 of conformance/resshift, METHODS.md §1).

``ScheduleConfig`` is the typed config of the residual-shifting diffusion; ``exponential_sqrt_etas``
turns it into the float64 sqrt(eta_t), t = 0..T-1, exactly as the official code computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class ScheduleConfig:
    """The eta schedule (README §2). Defaults are the released real-SR x4 v1/v2 settings."""

    steps: int = 15  # T
    kappa: float = 2.0  # noise scale
    min_noise_level: float = 0.04  # sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level)
    etas_end: float = 0.99  # sqrt(eta_T)
    power: float = 0.3  # p of the exponential schedule
    kind: Literal["exponential"] = "exponential"

    @property
    def etas_start(self) -> float:
        """sqrt(eta_1) (README §2: 0.02 for v1, 0.1 for v3)."""
        return min(self.min_noise_level / self.kappa, self.min_noise_level)

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(("steps", f"must be an integer >= 1, got {self.steps!r}"))
        for key in ("kappa", "min_noise_level", "power"):
            if not _is_number(getattr(self, key)) or not getattr(self, key) > 0:
                problems.append((key, f"must be a number > 0, got {getattr(self, key)!r}"))
        if not _is_number(self.etas_end) or not 0 < self.etas_end <= 1:
            msg = f"is sqrt(eta_T), must be in (0, 1], got {self.etas_end!r}"
            problems.append(("etas_end", msg))
        if self.kind != "exponential":
            problems.append(("kind", f"must be one of ['exponential'], got {self.kind!r}"))
        if not problems and self.steps > 1 and not self.etas_start < self.etas_end:
            problems.append(
                (
                    "min_noise_level",
                    f"sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level) = "
                    f"{self.etas_start!r} must be below etas_end = {self.etas_end!r}",
                )
            )
        return problems


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


REALSR_V1 = ScheduleConfig(steps=15)  # released v1/v2 real-SR x4 (README §2)
REALSR_V3 = ScheduleConfig(steps=4, min_noise_level=0.2)  # journal v3 real-SR x4 (README §2)


def exponential_sqrt_etas(cfg: ScheduleConfig) -> np.ndarray:
    """sqrt(eta_t) = etas_start * b ** ((t / (T-1)) ** p * (T-1)), b = (etas_end / etas_start)
    ** (1 / (T-1)), t = 0..T-1 (METHODS.md §1), evaluated in the official operation order so the
    float64 values match to the last bit. With T = 1 only the prior level etas_end remains."""
    T = cfg.steps
    if T == 1:
        return np.array([cfg.etas_end], dtype=np.float64)
    increaser = math.exp(1 / (T - 1) * math.log(cfg.etas_end / cfg.etas_start))
    power_timestep = np.linspace(0, 1, T, endpoint=True, dtype=np.float64) ** cfg.power * (T - 1)
    return np.power(increaser, power_timestep) * cfg.etas_start
