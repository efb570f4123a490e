"""distsr: distill diffusion super-resolution teachers into fast students, at cluster scale."""

__version__ = "0.1.0"
