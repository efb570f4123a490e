"""Typed config tree: YAML files in ``configs/`` + ``key=value`` overrides -> dataclasses.

Every component keeps its own dataclass next to its code; this module only knows how to
turn nested dicts into those dataclasses, collecting *every* problem into one ``ConfigError``
that names the dotted YAML path of each bad key or value.

Files a config names (weights, caches) are checked on load too, through ``missing_file``; inside
``planning_without_files()`` (``--dry-run``) an absent file is listed instead of refused, so a
cluster job can be planned on a machine that does not hold the weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config with one or more bad keys/values; ``problems`` lists ``(path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {path or '<root>'}: {msg}" for path, msg in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class MissingFile(tuple):
    """A ``(path, message)`` problem saying that a file named by the config does not exist."""

    def __new__(cls, key: str, message: str):
        return super().__new__(cls, (key, message))


_PLANNED_MISSING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "distsr_planned_missing_files", default=None
)


def missing_file(key: str, path: str | None, what: str = "weights file") -> list[tuple[str, str]]:
    """A config problem when a configured file does not exist (checked before any work)."""
    if path and not Path(path).expanduser().is_file():
        return [MissingFile(key, f"{what} not found: {path}")]
    return []


def missing_dir(key: str, path: str | None, what: str = "folder") -> list[tuple[str, str]]:
    """``missing_file`` for a configured folder (e.g. a teacher cache; local or on object
    storage, ``data.storage``)."""
    from distsr.data import storage

    if path and not storage.is_dir(path):
        return [MissingFile(key, f"{what} not found: {path}")]
    return []


@contextlib.contextmanager
def planning_without_files() -> Iterator[list[tuple[str, str]]]:
    """Load configs although files they name are absent: inside, every ``MissingFile`` problem
    is appended to the yielded list (dotted YAML path, message) instead of being an error."""
    found: list[tuple[str, str]] = []
    token = _PLANNED_MISSING.set(found)
    try:
        yield found
    finally:
        _PLANNED_MISSING.reset(token)


def raise_problems(problems: list[tuple[str, str]], source: str = "config") -> None:
    """Raise one ``ConfigError`` listing ``problems`` (missing files are set aside while
    ``planning_without_files`` is active)."""
    planned = _PLANNED_MISSING.get()
    if planned is not None:
        planned.extend(tuple(p) for p in problems if isinstance(p, MissingFile))
        problems = [p for p in problems if not isinstance(p, MissingFile)]
    if problems:
        raise ConfigError(problems, source)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, problems: list) -> Any:
    """Check/convert ``value`` against annotation ``tp``; append problems instead of raising."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        by_kind = _kinds(options)
        if by_kind and isinstance(value, dict):  # a union of configs told apart by ``kind``
            kind = value.get("kind", next(iter(by_kind)))
            if kind not in by_kind:
                problems.append((_join(path, "kind"), f"must be one of {list(by_kind)}, got "
                                 f"{kind!r}"))  # fmt: skip
                return value
            return _build(by_kind[kind], value, path, problems)
        for option in options:
            if option is type(None):
                continue
            trial: list = []
            out = _convert(value, option, path, trial)
            if not trial:
                return out
        problems.append((path, f"expected {_type_name(tp)}, got {value!r}"))
        return value
    if origin is Literal:
        if value not in get_args(tp):
            problems.append((path, f"must be one of {list(get_args(tp))}, got {value!r}"))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append((path, f"expected a mapping for {tp.__name__}, got {value!r}"))
            return tp()
        return _build(tp, value, path, problems)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append((path, f"expected a list, got {value!r}"))
            return value
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append((path, f"expected a mapping, got {value!r}"))
            return {}
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append((path, f"expected a number, got {value!r}"))
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((path, f"expected an integer, got {value!r}"))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((path, f"expected true/false, got {value!r}"))
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append((path, f"expected a string, got {value!r}"))
        return value
    return value


def _kinds(options: tuple) -> dict[str, type]:
    """``{kind: dataclass}`` when every option of a union is a dataclass whose ``kind`` field is a
    one-value ``Literal`` (the first option is the default kind); else empty."""
    by_kind: dict[str, type] = {}
    for option in options:
        if option is type(None):
            continue
        hints = typing.get_type_hints(option) if dataclasses.is_dataclass(option) else {}
        hint = hints.get("kind")
        if get_origin(hint) is not Literal or len(get_args(hint)) != 1:
            return {}
        by_kind[get_args(hint)[0]] = option
    return by_kind


def _build(cls: type, data: dict, path: str, problems: list) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        problems.append((_join(path, key), f"unknown key (valid: {', '.join(sorted(fields))})"))
    kwargs = {}
    for name, value in data.items():
        if name in fields:
            kwargs[name] = _convert(value, hints[name], _join(path, name), problems)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        problems.append((_join(path, name), "required key is missing"))
    if missing:
        return None
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            found = check() or []
        except (TypeError, ValueError):  # a field of the wrong type, reported above
            found = []
        problems.extend(_prefixed(path, problem) for problem in found)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _prefixed(path: str, problem: tuple[str, str]) -> tuple[str, str]:
    """A ``validate()`` problem with its node's path in front (a ``MissingFile`` stays one)."""
    key, msg = problem
    if isinstance(problem, MissingFile):
        return MissingFile(_join(path, key), msg)
    return (_join(path, key), msg)


def collect(cls: type, data: dict | None, path: str, problems: list[tuple[str, str]]):
    """Build dataclass ``cls`` from ``data`` at YAML ``path``, appending problems, not raising
    (for a config assembled from several parts that reports them all together)."""
    return _convert(data or {}, cls, path, problems)


def from_dict(cls: type, data: dict | None, source: str = "config", path: str = ""):
    """Build dataclass ``cls`` from ``data``; raise one ``ConfigError`` listing every problem."""
    problems: list[tuple[str, str]] = []
    obj = collect(cls, data, path, problems)
    raise_problems(problems, source)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for YAML dumps and Ray's train_loop_config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["engine.zero_stage=2", "data.shards=[a,b]"]`` -> [(path parts, YAML-parsed value)]."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([(item, "override must look like key.sub=value")], "overrides")
        value = yaml.safe_load(raw) if raw.strip() else ""
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict, items: list[str]) -> dict:
    """Return a copy of ``data`` with dotted overrides applied (creating mappings as needed)."""
    data = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for parts, value in parse_overrides(items):
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def resolve_config_path(spec: str, config_dir: Path = CONFIG_DIR, skip: Path | None = None) -> Path:
    """A YAML path, or a name in ``config_dir`` or ``configs/`` (``tadsr_seesr`` ->
    configs/tadsr_seesr.yaml, ``twins/tadsr_seesr`` -> configs/twins/tadsr_seesr.yaml); never
    ``skip`` (a file whose ``defaults`` name its own name: a twin in configs/twins/ and the
    released config it shrinks)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    for folder in dict.fromkeys((config_dir, CONFIG_DIR)):
        candidate = folder / f"{spec}.yaml"
        if candidate.is_file() and candidate.resolve() != skip:
            return candidate
    names = sorted(p.stem for p in config_dir.glob("*.yaml"))
    raise ValueError(f"unknown config or recipe {spec!r}; valid names: {', '.join(names)}")


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; ``defaults: [other]`` at the top merges other configs first."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"top level must be a mapping, got {type(data).__name__}")], str(path)
        )
    merged: dict = {}
    for parent in data.pop("defaults", []) or []:
        parent_path = resolve_config_path(parent, path.parent, skip=path.resolve())
        merged = deep_merge(merged, load_yaml(parent_path))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_job_config(cls: type, argv: list[str]):
    """``[CONFIG.yaml | NAME | -] [key=value ...]`` of an offline job -> a validated ``cls``
    (``-`` reads the YAML from stdin; no config: overrides only)."""
    import sys

    data, source = {}, "overrides"
    if argv and "=" not in argv[0]:
        source, argv = argv[0], argv[1:]
        data = (
            (yaml.safe_load(sys.stdin) or {})
            if source == "-"
            else load_yaml(resolve_config_path(source))
        )
        if not isinstance(data, dict):
            raise ValueError(f"{source}: top level must be a mapping of {cls.__name__} fields")
    return from_dict(cls, apply_overrides(data, argv), source=source)
