"""Peak dense TFLOP/s per accelerator (no structured sparsity). bf16 is what a bf16 engine uses;
an fp32 engine is planned at the TF32 tensor-core peak (PyTorch's default for convolutions;
matmuls reach it with ``torch.backends.cuda.matmul.allow_tf32``).

Sources: NVIDIA A100 datasheet (SXM: bf16 312, TF32 156); NVIDIA H100 datasheet (SXM: bf16
989.5, TF32 494.5 dense, half the "with sparsity" figures); NVIDIA H200 datasheet (same tensor
cores as H100 SXM: 989.5 / 494.5); NVIDIA L40S datasheet (bf16 362.05, TF32 183 dense); CPU: an
order of magnitude for one server socket with AVX-512 bf16 (about 64 cores x 2 GHz x 32 bf16
FLOPs per cycle per core ~ 4 TFLOP/s; fp32 half of it) -- measure yours.
"""

from __future__ import annotations

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312.0, "fp32": 156.0},
    "h100": {"bf16": 989.5, "fp32": 494.5},
    "h200": {"bf16": 989.5, "fp32": 494.5},
    "l40s": {"bf16": 362.05, "fp32": 183.0},
    "cpu": {"bf16": 4.0, "fp32": 2.0},
}
DEFAULT_MFU = 0.35  # model FLOPs utilisation assumed for projections (override with --mfu)


def peak_flops(gpu: str, precision: str) -> float:
    """Peak FLOP/s of ``gpu`` for an engine of ``precision`` (bf16 | fp32)."""
    key = gpu.lower()
    if key not in PEAK_TFLOPS:
        raise ValueError(f"unknown --gpu {gpu!r}; known: {', '.join(PEAK_TFLOPS)}")
    return PEAK_TFLOPS[key][precision] * 1e12
