"""Peak memory of one predictor call: what the call needs on top of what was allocated before it.

Weights and everything else alive before the call (other predictors, metric networks) are not
counted, so the number belongs to the predictor and the image, whatever ran earlier; the
weights' size follows from the parameter count.

* GPU: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` at the call's
  start, with the peak statistics reset before it (PyTorch's caching allocator).
* CPU (Linux): the growth of the process's resident-set high-water mark over its resident size at
  the call's start. Two resets make it the call's own: ``malloc_trim(0)`` hands the memory that
  earlier calls freed back to the system (else glibc keeps it resident and a later call that
  reuses it shows no growth at all), and writing ``5`` to ``/proc/self/clear_refs`` resets the
  high-water mark (``VmHWM``) to the current resident size. Resolution: 4 KiB pages; a call that
  fits in already resident, partly used pages can read low.
Where neither is available the meter reports no number rather than a wrong one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mib(key: str) -> float:
    found = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    return int(found.group(1)) / 1024


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


class CpuPeak:
    """Resident memory a call adds at its peak (MiB); see the module docstring."""

    kind = "CPU peak RSS growth of the call"

    def __init__(self):
        self.libc = _libc()

    def available(self) -> bool:
        try:
            self._reset()
            return self.libc is not None
        except OSError:
            return False

    def _reset(self) -> float:
        if self.libc is not None:
            self.libc.malloc_trim(0)
        _CLEAR_REFS.write_text("5")
        return _status_mib("VmRSS")

    def start(self) -> float:
        return self._reset()

    def stop(self, start: float) -> float:
        return max(0.0, _status_mib("VmHWM") - start)


class CudaPeak:
    """Bytes the caching allocator holds for tensors at the call's peak, above its start (MiB)."""

    kind = "GPU max_memory_allocated of the call"

    def start(self) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20

    def stop(self, start: float) -> float:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - start


class NoPeak:
    kind = "not measured (needs CUDA or Linux /proc/self/clear_refs)"

    def start(self) -> None:
        return None

    def stop(self, start) -> None:
        return None


def peak_meter(device: str | torch.device):
    """The meter for predictors running on ``device``."""
    if torch.device(device).type == "cuda":
        return CudaPeak()
    cpu = CpuPeak()
    return cpu if cpu.available() else NoPeak()
