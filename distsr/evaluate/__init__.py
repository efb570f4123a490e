"""``python -m distsr.evaluate``: pyiqa metrics (``metrics``), tables and grids (``report``),
the command line (``cli``)."""
