"""Teachers: frozen model(s) + sampler behind ``Teacher``, and where their targets come from
(``LiveTeacher`` computes them, ``CachedTeacher`` reads the teacher-output cache)."""

from distsr.teachers.base import Teacher
from distsr.teachers.regression import MultiTeacher, RegressionTeacher
from distsr.teachers.resshift import ResShiftTeacher, TeacherConfig, build_teacher

__all__ = [
    "MultiTeacher",
    "RegressionTeacher",
    "ResShiftTeacher",
    "Teacher",
    "TeacherConfig",
    "build_teacher",
]
