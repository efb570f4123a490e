"""JSON Schemas of every config, generated from the typed dataclasses the loader builds.

``python -m distsr.schema`` writes ``configs/schema/<name>.json`` (draft-07, what YAML editors
understand) and makes the first line of every ``configs/*.yaml`` the comment that points an
editor at its schema (``# yaml-language-server: $schema=schema/<name>.json``);
``--check`` only reports what is stale. One schema per recipe of ``registry.RECIPES``
(``run_<recipe>``: the run config with ``method`` = that recipe's ``Config``) and one per job of
``registry.JOB_CONFIGS`` (``cache_teacher``, ``demo``, ...), so a new recipe, job or teacher
kind needs no change here: re-run the command.

The schema follows ``config._convert`` rule for rule: unknown keys are refused
(``additionalProperties: false``), numbers are not booleans, a ``Literal`` is an ``enum``, and a
union of configs told apart by ``kind`` is a ``oneOf`` whose first member is also taken when
``kind`` is absent. What ``validate()`` hooks check (ranges, files) is the loader's alone.
A file with ``defaults: [...]`` holds only the keys it changes: it is checked as a partial
config (nothing required, a ``kind`` section may leave ``kind`` to the file it extends).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from distsr.config import CONFIG_DIR, _kinds, load_yaml, to_dict
from distsr.registry import JOB_CONFIGS, RECIPES, get_recipe, lookup

SCHEMA_DIR = CONFIG_DIR / "schema"
DRAFT = "http://json-schema.org/draft-07/schema#"
LINE_PREFIX = "# yaml-language-server: $schema="
DEFAULTS_KEY = {  # load_yaml merges the named configs first (config.load_yaml)
    "type": "array",
    "items": {"type": "string"},
    "description": "configs (names in configs/ or paths) merged before this file's keys",
}


# ---------------------------------------------------------------- types -> schema


class _Builder:
    """Collects the ``definitions`` of one schema file: a dataclass per entry, plus a
    ``.partial`` variant (no required keys, ``kind`` optional) where that differs."""

    def __init__(self):
        self.definitions: dict[str, dict] = {}
        self._differs: dict[type, bool] = {}

    def ref(self, cls: type, partial: bool, replace: dict | None = None) -> dict:
        partial = partial and self.differs(cls)
        name = _def_name(cls) + (".partial" if partial else "")
        if name not in self.definitions:
            self.definitions[name] = {}  # reserved first: a config may contain itself
            self.definitions[name] = self.dataclass(cls, partial, replace or {})
        return {"$ref": f"#/definitions/{name}"}

    def dataclass(self, cls: type, partial: bool, replace: dict) -> dict:
        hints = {**typing.get_type_hints(cls), **replace}
        notes = _field_comments(cls)
        properties, required = {}, []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            prop = dict(self.of(hints[f.name], partial))
            if f.name in notes:
                prop["description"] = notes[f.name]
            default = _default(f)
            shown = default is not dataclasses.MISSING and f.name not in replace
            if shown and not isinstance(default, dict):  # a section's defaults: its own fields'
                prop["default"] = default
            properties[f.name] = prop
            if default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out: dict[str, Any] = {"type": "object"}
        doc = _docstring(cls)
        if doc:
            out["description"] = doc
        out |= {"properties": properties, "additionalProperties": False}
        if required and not partial:
            out["required"] = required
        return out

    def of(self, tp: Any, partial: bool) -> dict:
        """The schema of one annotation, as ``config._convert`` checks it."""
        origin = get_origin(tp)
        if tp is Any:
            return {}
        if origin in (typing.Union, types.UnionType):
            return self.union(get_args(tp), partial)
        if origin is Literal:
            return {"enum": list(get_args(tp))}
        if dataclasses.is_dataclass(tp):
            return self.ref(tp, partial)
        if origin in (list, tuple):
            args = [a for a in get_args(tp) if a is not Ellipsis]
            items = self.of(args[0], partial) if args else {}  # the loader checks args[0]
            return {"type": "array", "items": items} if items else {"type": "array"}
        if origin is dict or tp is dict:
            return {"type": "object"}
        simple = {float: "number", int: "integer", bool: "boolean", str: "string"}
        return {"type": simple[tp]} if tp in simple else {}

    def union(self, options: tuple, partial: bool) -> dict:
        nullable = type(None) in options
        options = tuple(o for o in options if o is not type(None))
        by_kind = _kinds(options)
        if by_kind:
            choices = []
            for i, cls in enumerate(by_kind.values()):
                member = self.ref(cls, partial)
                if i and not partial:  # ``kind`` may be left out for the first kind only
                    member = {"allOf": [member], "required": ["kind"]}
                choices.append(member)
            schema = {"type": "object", ("anyOf" if partial else "oneOf"): choices}
        else:
            schema = {"anyOf": [self.of(o, partial) for o in options]}
        if nullable:
            return {"anyOf": [{"type": "null"}, schema]}
        return schema

    def differs(self, cls: type) -> bool:
        """Whether the partial variant of ``cls`` differs from the full one."""
        if cls not in self._differs:
            self._differs[cls] = False  # a config containing itself adds nothing new
            hints = typing.get_type_hints(cls)
            fields = [f for f in dataclasses.fields(cls) if f.init]
            self._differs[cls] = any(_default(f) is dataclasses.MISSING
                                     and f.default_factory is dataclasses.MISSING
                                     for f in fields) or any(
                self._type_differs(hints[f.name]) for f in fields)  # fmt: skip
        return self._differs[cls]

    def _type_differs(self, tp: Any) -> bool:
        if dataclasses.is_dataclass(tp):
            return self.differs(tp)
        args = () if get_origin(tp) is Literal else get_args(tp)
        if get_origin(tp) in (typing.Union, types.UnionType) and _kinds(args):
            return True
        return any(self._type_differs(a) for a in args if a is not Ellipsis)


def _def_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _default(f: dataclasses.Field) -> Any:
    """A field's default as JSON (a factory's value too), or MISSING (required or not JSON)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    value = to_dict(value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return dataclasses.MISSING


def _docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes, not a text
        return ""
    return " ".join(inspect.cleandoc(doc).split())


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: text}`` of the ``# ...`` comments on each field's lines in the source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith(("fmt:", "noqa", "type:")):
                comments[tok.start[0]] = text
    body = ast.parse(source).body[0].body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            text = " ".join(comments[i] for i in lines if i in comments)
            if text:
                out[node.target.id] = text
    return out


# ---------------------------------------------------------------- one schema per config kind


def schema_of(title: str, description: str, root: type, replace: dict | None = None) -> dict:
    builder = _Builder()
    full = builder.ref(root, partial=False, replace=replace)
    partial = builder.ref(root, partial=True, replace=replace)
    for name in (full["$ref"], partial["$ref"]):  # the root also takes ``defaults: [...]``
        node = builder.definitions[name.rsplit("/", 1)[1]]
        node["properties"] = {"defaults": DEFAULTS_KEY, **node["properties"]}
    if partial == full:  # nothing required, no ``kind``: a partial file checks the same
        which = {"allOf": [full]}
    else:
        which = {"if": {"required": ["defaults"]}, "then": partial, "else": full}
    return {"$schema": DRAFT, "title": title, "description": description, **which,
            "definitions": dict(sorted(builder.definitions.items()))}  # fmt: skip


def run_schema(recipe: str) -> dict:
    from distsr.runconfig import RunConfig

    config = get_recipe(recipe).Config
    replace = {"recipe": Literal[recipe], "method": config | None}
    description = (f"A run of recipe {recipe!r}: python -m distsr.launch CONFIG; `method` is "
                   f"{config.__module__}.{config.__qualname__}")  # fmt: skip
    return schema_of(f"distsr run ({recipe})", description, RunConfig, replace)


def job_schema(job: str) -> dict:
    config = lookup(JOB_CONFIGS, job, "job")
    description = f"The {job} job's config ({config.__module__}.{config.__qualname__})"
    return schema_of(f"distsr job: {job}", description, config)


def schemas() -> dict[str, dict]:
    """Schema file name (no suffix) -> schema, for every recipe and job in the registries."""
    out = {f"run_{r}": run_schema(r) for r in RECIPES}
    out.update({job: job_schema(job) for job in JOB_CONFIGS})
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- configs/*.yaml -> schema


def schema_name(path: Path) -> str:
    """The schema a config file follows: ``run_<recipe>`` when it (with its ``defaults``) names
    a recipe, else the one job whose config has every top-level key."""
    data = load_yaml(path)
    if "recipe" in data:
        if data["recipe"] not in RECIPES:
            raise ValueError(f"{path}: unknown recipe {data['recipe']!r}")
        return f"run_{data['recipe']}"
    fits = [job for job in JOB_CONFIGS if set(data) <= _field_names(lookup(JOB_CONFIGS, job, ""))]
    named = _named_schema(path)
    if len(fits) > 1 and named in fits:  # the file's own line settles a tie
        return named
    if len(fits) != 1:
        raise ValueError(f"{path}: no recipe, and its keys fit the jobs {fits or 'none'} of "
                         f"{sorted(JOB_CONFIGS)}; set `recipe:` or name one schema line "
                         f"({LINE_PREFIX}schema/<job>.json)")  # fmt: skip
    return fits[0]


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _named_schema(path: Path) -> str | None:
    first = path.read_text().split("\n", 1)[0]
    if first.startswith(LINE_PREFIX):
        return Path(first[len(LINE_PREFIX) :].strip()).stem
    return None


def schema_line(name: str, up: str = "") -> str:
    return f"{LINE_PREFIX}{up}{SCHEMA_DIR.name}/{name}.json"


def stamped(text: str, name: str, up: str = "") -> str:
    """``text`` with its first line the schema comment (replacing an older one); ``up`` leads
    from a file's folder to ``configs/`` (``../`` for the twins)."""
    lines = text.split("\n")
    if lines and lines[0].startswith(LINE_PREFIX):
        lines = lines[1:]
    return "\n".join([schema_line(name, up), *lines])


# ---------------------------------------------------------------- the command


def stale(config_dir: Path = CONFIG_DIR, schema_dir: Path = SCHEMA_DIR) -> dict[Path, str]:
    """Every file the command would write or delete -> its new text ("" = delete)."""
    out: dict[Path, str] = {}
    wanted = {schema_dir / f"{n}.json": render(s) for n, s in schemas().items()}
    for path, text in wanted.items():
        if not path.is_file() or path.read_text() != text:
            out[path] = text
    for path in sorted(schema_dir.glob("*.json")):
        if path not in wanted:
            out[path] = ""
    for path in sorted([*config_dir.glob("*.yaml"), *config_dir.glob("twins/*.yaml")]):
        text = path.read_text()
        new = stamped(text, schema_name(path), "../" if path.parent != config_dir else "")
        if new != text:
            out[path] = new
    return out


def write(changes: dict[Path, str]) -> None:
    for path, text in changes.items():
        if not text:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distsr.schema",
        description="Write configs/schema/*.json from the typed configs and point every "
        "configs/*.yaml at its schema (first-line comment).",
    )
    parser.add_argument("--check", action="store_true", help="only list what is stale (exit 1)")
    args = parser.parse_args(argv)
    changes = stale()
    for path, text in changes.items():
        verb = "delete" if not text else ("stale" if args.check else "wrote")
        print(f"{verb}: {path.relative_to(CONFIG_DIR.parent)}")
    if args.check:
        return 1 if changes else 0
    write(changes)
    print(f"{len(changes)} file(s) changed; {len(schemas())} schemas in {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
