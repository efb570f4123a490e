"""``python -m distsr.upscale``: upscale images with a student, or export it (``cli``)."""
