"""Image files for inference and evaluation: uint8 HWC RGB <-> [1, 3, H, W] floats in [0, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | Path) -> list[Path]:
    """A file as itself; a folder's image files (by extension, not recursive), sorted by name."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"{path} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    return files


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
    """HxWx3 uint8 -> [1, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] or [3, H, W] in [0, 1] -> HxWx3 uint8 (rounded)."""
    x = x.detach().float().cpu()
    x = x[0] if x.ndim == 4 else x
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
