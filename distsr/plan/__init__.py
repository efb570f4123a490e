"""Plan a run before paying for it: ``python -m distsr.plan CONFIG --gpus N --gpu NAME``.

FLOPs (``flops``), per-rank memory (``memory``), shard and cache bytes (``bytes``) and projected
GPU-hours (``report``) of a config, from its real networks built on the meta device
(``workload``): no weights are read, no GPU is needed.
"""
