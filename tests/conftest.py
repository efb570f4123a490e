"""Shared fixtures: real photos, real shards written on the fly, a real local Ray cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def load_job(name: str):
    """Import ``jobs/<name>.py`` (jobs are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        Image.fromarray(img).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_shards(photos_dir, tmp_path_factory) -> Path:
    """~200 gt crops of 32x32 (lq 8x8, bicubic) in 4 shards."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    load_job("make_shards").main(
        [f"inputs=[{photos_dir}]", f"output={out}", "crop_size=32", "stride=64", "shard_size=64"]
    )
    return out


@pytest.fixture(scope="session")
def twin_shards(photos_dir, tmp_path_factory) -> Path:
    """25 gt crops of 32x32 (lq 8x8, bicubic) in 3 shards: the tiny twins' data (configs/twins/),
    small so that their teachers' cache jobs take seconds."""
    out = tmp_path_factory.mktemp("twin_shards") / "tiny"
    load_job("make_shards").main(
        [f"inputs=[{photos_dir}]", f"output={out}", "crop_size=32", "crop_mode=random",
         "random_crops=5", "shard_size=12"]  # fmt: skip
    )
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def tiny_overrides(run_root: Path, shards: Path, *extra: str) -> list[str]:
    return [f"output_dir={run_root}", f"data.shards=[{shards}]", *extra]
