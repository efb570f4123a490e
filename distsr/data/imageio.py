"""Image files: uint8 HWC RGB arrays <-> [3, H, W] float tensors in [0, 1], and image listing.

Shared by the shard writer, the shard readers, inference and evaluation."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distsr.data.bundled import expand_bundled
from distsr.data.config import IMAGE_EXTENSIONS


def list_images(
    inputs: str | Path | Sequence[str | Path],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    *,
    recursive: bool = True,
) -> list[Path]:
    """Image files named by ``inputs`` (one or a list), in a stable order without repeats.

    Each input is ``bundled`` / ``bundled:eval`` (photos shipped with installed packages), a
    folder (sorted; subfolders too when ``recursive``), a glob (sorted matches) or a file; only
    files whose suffix is in ``extensions`` are kept. ValueError names an input that yields none.
    """
    specs = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    exts = {e.lower() for e in extensions}
    found: dict[Path, None] = {}
    for spec in map(str, specs):
        matches = [p for p in _candidates(spec, recursive) if p.suffix.lower() in exts]
        matches = [p for p in matches if p.is_file()]
        if not matches:
            why = "" if glob.glob(str(Path(spec).expanduser())) else ": no such file or folder"
            raise ValueError(f"{spec!r} holds no image file ({', '.join(sorted(exts))}){why}")
        found.update(dict.fromkeys(matches))
    return list(found)


def _candidates(spec: str, recursive: bool) -> list[Path]:
    path = Path(spec).expanduser()
    bundled = expand_bundled(spec)
    if bundled is not None:
        return bundled
    if path.is_dir():
        return sorted(path.rglob("*") if recursive else path.iterdir())
    if any(c in spec for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    return [path]


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grey is repeated, alpha dropped); ValueError naming unreadable files."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write atomically (temp name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> contiguous [3, H, W] float32 in [0, 1] (``[None]`` makes a batch of one)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] in [0, 1] -> HxWx3 uint8 (rounded)."""
    x = x.detach().float().cpu()
    x = x[0] if x.ndim == 4 else x
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
