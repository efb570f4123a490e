"""The import boundaries of the code: deepspeed is imported only in distsr/engine/; ray only in
distsr/launch.py, distsr/engine/ray_adapter.py and jobs/ (every import statement, at any depth,
read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

ALLOWED = {  # package -> the paths (a folder ends in /) that may import it
    "deepspeed": ("distsr/engine/",),
    "ray": ("distsr/launch.py", "distsr/engine/ray_adapter.py", "jobs/"),
}


def imported(source: str) -> set[str]:
    """Top-level package names of every ``import`` / ``from ... import`` in ``source``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_parser_sees_nested_and_from_imports():
    source = "def f():\n    from ray.util import ActorPool\n    import deepspeed.comm as dist\n"
    assert imported(source) == {"ray", "deepspeed"}


def test_deepspeed_and_ray_are_imported_only_where_allowed():
    files = [*ROOT.glob("distsr/**/*.py"), *ROOT.glob("jobs/**/*.py")]
    assert len(files) > 50
    broken = []
    for file in files:
        path = Path(file).relative_to(ROOT).as_posix()
        for package in imported(file.read_text()) & set(ALLOWED):
            if not path.startswith(ALLOWED[package]):
                broken.append(f"{path} imports {package}")
    assert broken == []
    # and the allowed places do use them (the rule guards something real)
    assert "ray" in imported((ROOT / "distsr/engine/ray_adapter.py").read_text())
    assert any("deepspeed" in imported(f.read_text()) for f in ROOT.glob("distsr/engine/*.py"))
