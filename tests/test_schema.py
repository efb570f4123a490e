"""The generated JSON Schemas: every config in configs/ validates against the schema its first
line names, the checked-in schemas are what the generator writes now, and the schema refuses
what the loader refuses (unknown keys, wrong types, an unknown ``kind``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import jsonschema
import pytest
import yaml

from distsr.config import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    from_dict,
    load_yaml,
    planning_without_files,
)
from distsr.registry import JOB_CONFIGS, RECIPES, lookup
from distsr.runconfig import parse_run_config
from distsr.schema import LINE_PREFIX, SCHEMA_DIR, schema_name, schema_of, stale

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        out[path.stem] = jsonschema.Draft7Validator(schema)
    return out


def errors(validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in
            validator.iter_errors(data)]  # fmt: skip


def test_the_checked_in_schemas_and_schema_lines_are_current():
    changes = stale()
    assert not changes, "stale, run `python -m distsr.schema`: " + ", ".join(
        str(p.relative_to(CONFIG_DIR.parent)) for p in changes
    )
    assert {f"run_{r}" for r in RECIPES} | set(JOB_CONFIGS) == {
        p.stem for p in SCHEMA_DIR.glob("*.json")
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_against_the_schema_its_first_line_names(name, validators):
    path = CONFIG_DIR / name
    first, rest = path.read_text().split("\n", 1)
    assert first == f"{LINE_PREFIX}schema/{schema_name(path)}.json"
    assert yaml.safe_load(rest) == yaml.safe_load(first + "\n" + rest)  # a comment to the loader
    validator = validators[schema_name(path)]
    assert errors(validator, yaml.safe_load(rest)) == []  # the file as an editor sees it
    assert errors(validator, load_yaml(path)) == []  # merged with its ``defaults``


def load(name: str, data: dict):
    """The project's loader for config ``name``: a run config or its job's config."""
    with planning_without_files():  # weights named by the configs are absent here
        if "recipe" in data:
            return parse_run_config(data, source=name)
        job = schema_name(CONFIG_DIR / f"{name}.yaml")
        return from_dict(lookup(JOB_CONFIGS, job, "job"), data, source=name)


REFUSED = [  # (config, override, the dotted key the loader names)
    ("tadsr_tiny", "engine.bogus=1", "engine.bogus"),
    ("tadsr_tiny", "bogus=1", "bogus"),
    ("tadsr_tiny", "method.teacher.bogus=1", "method.teacher.bogus"),  # inside a kind union
    ("cache_seesr", "teacher.ram.bogus=1", "teacher.ram.bogus"),
    ("mtkd_tiny", "method.student.bogus=1", "method.student.bogus"),
    ("demo", "bogus=1", "bogus"),
    ("resshift_tiny", "engine.precision=fp16", "engine.precision"),  # a Literal
    ("resshift_tiny", "engine.zero_stage='2'", "engine.zero_stage"),  # "2" is not 2
    ("resshift_tiny", "engine.grad_clip=true", "engine.grad_clip"),  # a bool is not a number
    ("dtkd_tiny", "method.teacher.kind=nope", "method.teacher.kind"),
    ("dtkd_tiny", "data.shards=tiny", "data.shards"),  # not a list
]


@pytest.mark.parametrize(("name", "override", "key"), REFUSED)
def test_the_schema_refuses_what_the_loader_refuses(name, override, key, validators):
    path = CONFIG_DIR / f"{name}.yaml"
    validator = validators[schema_name(path)]
    good = load_yaml(path)
    load(name, good)  # the comparison can fail: both accept the file as it is
    assert errors(validator, good) == []
    bad = apply_overrides(good, [override])
    with pytest.raises(ConfigError) as refused:
        load(name, bad)
    assert key in [k for k, _ in refused.value.problems]
    assert errors(validator, bad), f"the schema accepts {override}"


@dataclass
class Plain:  # configs defined only here: the generator follows the types, whatever they are
    kind: Literal["plain"] = "plain"
    size: int = 1


@dataclass
class Fancy:
    kind: Literal["fancy"] = "fancy"
    style: str = "bold"


@dataclass
class Job:
    name: str
    part: Plain | Fancy = field(default_factory=Plain)


def test_a_kind_left_out_means_the_first_kind_and_a_partial_file_needs_no_kind():
    """Generated from the configs above: the union's first member is taken when ``kind``
    is absent (as the loader does); a file with ``defaults`` may leave ``kind`` and required
    keys to the file it extends."""
    validator = jsonschema.Draft7Validator(schema_of("test", "test", Job))
    for data in ({"name": "a"}, {"name": "a", "part": {"size": 2}},
                 {"name": "a", "part": {"kind": "fancy", "style": "x"}}):  # fmt: skip
        assert errors(validator, data) == []
        from_dict(Job, data)
    for data in ({"part": {}}, {"name": "a", "part": {"style": "x"}},
                 {"name": "a", "part": {"kind": "fancy", "size": 2}}):  # fmt: skip
        assert errors(validator, data)
        with pytest.raises(ConfigError):
            from_dict(Job, data)
    assert errors(validator, {"defaults": ["x"], "part": {"style": "x"}}) == []
    assert errors(validator, {"defaults": ["x"], "part": {"colour": "x"}})
