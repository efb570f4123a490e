"""Inference: super-resolution predictors (``predictors``: ResShift and the loader; ``seesr``:
SeeSR) and tiled upscaling (``tiling``)."""
