"""Teachers: frozen model(s) + sampler behind ``Teacher``, and where their targets come from
(``LiveTeacher`` computes them, ``CachedTeacher`` reads the teacher-output cache)."""

from distsr.teachers.base import Teacher
from distsr.teachers.resshift import (
    ResShiftTeacher,
    TeacherConfig,
    build_teacher,
    noise_for,
    noise_from_seeds,
)
from distsr.teachers.source import CachedTeacher, LiveTeacher, TeacherSource, check_cache

__all__ = [
    "CachedTeacher",
    "LiveTeacher",
    "ResShiftTeacher",
    "Teacher",
    "TeacherConfig",
    "TeacherSource",
    "build_teacher",
    "check_cache",
    "noise_for",
    "noise_from_seeds",
]
