"""The top-level run config: which recipe, its typed section, data, engine and scaling.

Parsed once, on the driver (``load_run_config``); the ``RunConfig`` object itself, with
``method`` already the recipe's typed config, is what the workers receive.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distsr.config import (
    apply_overrides,
    collect,
    load_yaml,
    raise_problems,
    resolve_config_path,
)
from distsr.config import to_dict as to_plain
from distsr.data import storage
from distsr.data.config import DataConfig
from distsr.engine.config import DebugConfig, EngineConfig, ScalingConfig
from distsr.registry import RECIPES, get_recipe


@dataclass
class RunConfig:
    name: str
    recipe: str
    seed: int = 0
    output_dir: str = "runs"  # run folder = output_dir/name (shared storage or s3://...)
    method: Any = None  # the recipe's typed config: an instance of RECIPES[recipe].Config
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def run_url(self) -> str:
        """The run folder where it is kept: a local path or an ``s3://`` URL."""
        if storage.is_remote(self.output_dir):
            return storage.join(self.output_dir, self.name)
        return str(self.run_dir)

    @property
    def run_dir(self) -> Path:
        """The run folder this process works in: ``run_url`` itself when local, a temp copy of
        it (``storage.staging_dir``, kept in step by ``storage.Mirror``) on object storage."""
        if storage.is_remote(self.output_dir):
            return storage.staging_dir(self.run_url)
        return Path(self.output_dir).expanduser().resolve() / self.name

    def validate(self):
        if self.recipe not in RECIPES:
            return [("recipe", f"unknown recipe {self.recipe!r}; valid: {', '.join(RECIPES)}")]
        return []


def parse_run_config(data: dict, source: str = "run config") -> RunConfig:
    """A run config mapping -> ``RunConfig`` whose ``method`` is built by the recipe's own
    ``Config`` dataclass; every problem of both levels is raised together in one ``ConfigError``
    (errors in the recipe's section are named ``method.<key>``). A method config with a
    ``complete(run)`` fills there the defaults it derives from the other sections."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data.get("method") or {}, dict):
        problems.append(("method", f"expected a mapping, got {data['method']!r}"))
    cfg = collect(RunConfig, {k: v for k, v in data.items() if k != "method"}, "", problems)
    recipe = data.get("recipe")
    method = None
    if recipe in RECIPES and isinstance(data.get("method") or {}, dict):
        method = collect(get_recipe(recipe).Config, data.get("method"), "method", problems)
    raise_problems(problems, source)
    cfg.method = method
    if hasattr(method, "complete"):  # defaults a recipe derives from the rest of the run
        method.complete(cfg)
    return cfg


def load_run_config(spec: str, overrides: list[str] = ()) -> RunConfig:
    """``spec`` is a YAML path (e.g. a run folder's ``config.yaml``) or a name in ``configs/``;
    all problems are raised together; local paths are made absolute."""
    path = resolve_config_path(spec)
    data = apply_overrides(load_yaml(path), list(overrides))
    return absolutize_paths(parse_run_config(data, source=str(path)))


def absolute_path(spec: str) -> str:
    """Local paths are made absolute here, on the driver: Ray workers run in other folders."""
    if "://" in spec or spec.startswith("pipe:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


PATH_KEYS = ("checkpoint", "unet_checkpoint", "cache_dir",  # local files named in ``method``
             "sd2_dir", "seesr_dir", "dape", "tag_list", "tag_thresholds",
             "restorer_checkpoint", "prior_checkpoint")  # fmt: skip
PATH_LIST_KEYS = ("model_files",)  # lists of local files


def _absolutize_method_paths(node: Any) -> Any:
    """Make the ``PATH_KEYS`` fields of a typed config tree absolute, in place."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.name in PATH_KEYS and isinstance(value, str):
                setattr(node, f.name, absolute_path(value))
            elif f.name in PATH_LIST_KEYS and isinstance(value, list):
                setattr(node, f.name, [absolute_path(v) for v in value])
            else:
                _absolutize_method_paths(value)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in PATH_KEYS and isinstance(value, str):
                node[key] = absolute_path(value)
            else:
                _absolutize_method_paths(value)
    elif isinstance(node, list | tuple):
        for value in node:
            _absolutize_method_paths(value)
    return node


absolutize_file_keys = _absolutize_method_paths  # for job configs (the cache job's teacher)


def absolutize_paths(cfg: RunConfig) -> RunConfig:
    cfg.output_dir = absolute_path(cfg.output_dir)
    cfg.data.shards = [absolute_path(s) for s in cfg.data.shards]
    _absolutize_method_paths(cfg.method)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return to_plain(cfg)


def replace(cfg: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(cfg, **changes)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_output_dir(cfg: RunConfig) -> None:
    """Fail before any work when the run folder cannot be written or its disk is nearly full."""
    if storage.is_remote(cfg.run_url):
        probe = storage.join(cfg.run_url, f".write_probe_{os.getpid()}")
        try:
            storage.write_bytes(probe, b"ok")
            storage.remove(probe)
        except OSError as err:
            raise ValueError(f"output folder {cfg.run_url} is not writable: {err}") from None
        return
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output folder {run_dir} is not writable: {err}") from None
    free_gb = shutil.disk_usage(run_dir).free / 1e9
    if free_gb < cfg.engine.min_free_gb:
        raise ValueError(
            f"only {free_gb:.2f} GB free on the disk of {run_dir}, less than "
            f"engine.min_free_gb={cfg.engine.min_free_gb:g}: free space or pick another output_dir"
        )


def write_run_record(cfg: RunConfig, argv: list[str] | None = None) -> Path | str:
    """Write the resolved config, git revision and command line into the run folder; returns
    it (a URL on object storage)."""
    record = {
        "git_revision": git_revision(),
        "command": " ".join(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
    }
    files = {"config.yaml": to_dict(cfg), "run.yaml": record}
    for name, content in files.items():
        text = yaml.safe_dump(content, sort_keys=False).encode()
        storage.write_bytes(storage.join(cfg.run_url, name), text)
    return cfg.run_url if storage.is_remote(cfg.run_url) else cfg.run_dir
