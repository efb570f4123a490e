"""Fingerprints: what identifies a teacher (or any frozen model + settings) across processes.

``fingerprint_of(parts)`` hashes JSON-able parts (kind, weights hash, sampler, ...) into
``<kind>-<16 hex digits>``; the teacher-output cache lives in a folder named after it, and
``parts_differ`` names each part in which a cache's teacher differs from the configured one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import nn

FINGERPRINT_DIGITS = 16  # hex digits of the fingerprint after the kind


def fingerprint_of(parts: dict) -> str:
    """``<kind>-<16 hex digits>`` from the fingerprint parts (stable across processes)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(blob).hexdigest()[:FINGERPRINT_DIGITS]
    return f"{parts.get('kind', 'teacher')}-{digest}"


def hash_modules(named: Iterable[tuple[str, nn.Module | None]], extra: dict | None = None) -> str:
    """sha256 over ``extra`` (architecture settings, as sorted JSON) and every module's state
    dict in sorted key order: key, dtype, shape and raw bytes of each tensor."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name, module in named:
        h.update(f"<{name}>".encode())
        if module is None:
            continue
        state = module.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parts_differ(cached: dict, configured: dict) -> list[str]:
    """Human-readable lines naming each fingerprint part that differs (empty if none)."""
    lines = []
    for key in sorted(set(cached) | set(configured)):
        a, b = cached.get(key), configured.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sub)
        else:
            detail = f"{_short(a)} vs {_short(b)}"
        lines.append(f"{key} ({detail})")
    return lines


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "...'"
