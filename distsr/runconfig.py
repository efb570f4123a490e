"""The top-level run config: which recipe, its typed section, data, engine and scaling."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distsr.config import ConfigError, apply_overrides, from_dict, load_yaml, resolve_config_path
from distsr.config import to_dict as to_plain
from distsr.data.config import DataConfig
from distsr.engine.config import DebugConfig, EngineConfig, ScalingConfig
from distsr.registry import RECIPES, get_recipe


@dataclass
class RunConfig:
    name: str
    recipe: str
    seed: int = 0
    output_dir: str = "runs"  # run folder = output_dir/name (shared storage on a cluster)
    method: dict = field(default_factory=dict)  # validated by the recipe's own Config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    def validate(self):
        if self.recipe not in RECIPES:
            return [("recipe", f"unknown recipe {self.recipe!r}; valid: {', '.join(RECIPES)}")]
        return []


def method_config(cfg: RunConfig):
    """The recipe's typed config built from ``cfg.method`` (errors name ``method.<key>``)."""
    recipe_cls = get_recipe(cfg.recipe)
    return from_dict(recipe_cls.Config, cfg.method, source=f"recipe {cfg.recipe}", path="method")


def load_run_config(spec: str, overrides: list[str] = ()) -> RunConfig:
    """``spec`` is a YAML path or a name in ``configs/``; all problems are raised together."""
    path = resolve_config_path(spec)
    data = apply_overrides(load_yaml(path), list(overrides))
    problems: list[tuple[str, str]] = []
    cfg = None
    try:
        cfg = from_dict(RunConfig, data, source=str(path))
    except ConfigError as err:
        problems += err.problems
    recipe, method = data.get("recipe"), data.get("method")
    if recipe in RECIPES and isinstance(method, dict | None):
        try:
            from_dict(get_recipe(recipe).Config, method, source=str(path), path="method")
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems, str(path))
    return absolutize_paths(cfg)


def absolute_path(spec: str) -> str:
    """Local paths are made absolute here, on the driver: Ray workers run in other folders."""
    if "://" in spec or spec.startswith("pipe:"):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


PATH_KEYS = ("checkpoint", "unet_checkpoint", "cache_dir")  # local files named in ``method``


def _absolute_method_paths(node):
    if isinstance(node, dict):
        return {
            k: absolute_path(v)
            if k in PATH_KEYS and isinstance(v, str)
            else _absolute_method_paths(v)
            for k, v in node.items()
        }
    return node


def absolutize_paths(cfg: RunConfig) -> RunConfig:
    cfg.output_dir = absolute_path(cfg.output_dir)
    cfg.data.shards = [absolute_path(s) for s in cfg.data.shards]
    cfg.method = _absolute_method_paths(cfg.method)
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


def write_run_record(cfg: RunConfig, argv: list[str] | None = None) -> Path:
    """Write the resolved config, git revision and command line into the run folder."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record = {
        "git_revision": git_revision(),
        "command": " ".join(argv if argv is not None else sys.argv),
        "cwd": os.getcwd(),
    }
    (run_dir / "run.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    return run_dir
