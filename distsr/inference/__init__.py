"""Inference: super-resolution predictors (``predictors``) and tiled upscaling (``tiling``)."""
