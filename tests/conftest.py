"""Shared fixtures: real photos, real shards written on the fly, a real local Ray cluster, the
demo run once per session; and a home of its own for the test session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
REAL_HOME = Path.home()
HOME_KEY = pytest.StashKey[Path]()
RAY_DIR_KEY = pytest.StashKey[dict | None]()


def listing(folder: Path) -> dict[str, tuple[int, int]] | None:
    """Every path under ``folder`` with its mtime (ns) and size; None when it does not exist."""
    if not folder.exists():
        return None
    found = {".": (folder.stat().st_mtime_ns, 0)}
    for path in folder.rglob("*"):
        stat = path.lstat()
        found[str(path.relative_to(folder))] = (stat.st_mtime_ns, stat.st_size)
    return found


def pytest_configure(config):
    """Tests never write into the user's home: HOME is a temporary folder for this process and
    every process it starts (Ray's ``~/.ray``, the torch hub and extension caches with the
    NIQE/BRISQUE parameter files, matplotlib's cache land there); the XDG folders follow it."""
    config.stash[RAY_DIR_KEY] = listing(REAL_HOME / ".ray")
    home = Path(tempfile.mkdtemp(prefix="distsr-test-home-"))
    config.stash[HOME_KEY] = home
    os.environ["HOME"] = str(home)
    for key in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        os.environ.pop(key, None)


def pytest_sessionfinish(session, exitstatus):
    """The session fails if it changed the user's ``~/.ray`` (Ray's token and settings)."""
    ray_dir = REAL_HOME / ".ray"
    if listing(ray_dir) != session.config.stash[RAY_DIR_KEY]:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")  # after the progress line
            reporter.write_sep("!", f"FAILED: the tests changed {ray_dir} (the user's home)",
                               red=True)  # fmt: skip
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    os.environ["HOME"] = str(REAL_HOME)
    shutil.rmtree(config.stash[HOME_KEY], ignore_errors=True)


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
    args = ["crop_size=32", "crop_mode=random", "random_crops=5", "shard_size=12"]
    load_job("make_shards").main([f"inputs=[{photos_dir}]", f"output={out}", *args])
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (its numbers were recorded so), restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from distsr.launch import private_cluster_env

    with private_cluster_env():  # a token of its own, as distsr's private clusters have
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
        yield ray
        ray.shutdown()


# `python -m distsr.launch demo` (README) at a reduced size: shards at stride 160, a few steps
DEMO_OVERRIDES = ("stride=160", "teacher_steps=6", "student_steps=4", "kd_steps=4", "eval_size=64")


@dataclass
class DemoRun:
    out: Path
    cmd: list[str]
    env: dict[str, str]
    returncode: int
    log: str
    token_before: bool  # whether $HOME/.ray/auth_token existed before the demo ran
    token_after: bool


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The README's demo, run once per session in this session's home (tests/test_demo.py checks
    its report; tests/test_readme.py runs the README's other commands after it)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    cmd = [sys.executable, "-m", "distsr.launch", "demo", f"output_dir={out}", *DEMO_OVERRIDES]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    token = Path.home() / ".ray" / "auth_token"
    before = token.exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return DemoRun(out, cmd, env, done.returncode, done.stdout + done.stderr, before,
                   token.exists())  # fmt: skip


def tiny_overrides(run_root: Path, shards: Path, *extra: str) -> list[str]:
    return [f"output_dir={run_root}", f"data.shards=[{shards}]", *extra]
