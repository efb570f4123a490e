"""Every ``jobs/bench_*.py`` is a thin command line over ``distsr.bench``: ``--help`` prints its
docstring and runs nothing, and every command BENCHMARKS.md and the docstrings give parses into
the job's config (parsing only: nothing is run or written)."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from distsr.bench.cli import BenchJob
from tests.conftest import ROOT, load_job

JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("bench_*.py"))
COMMAND = re.compile(r"python jobs/(bench_\w+)\.py([^`\n]*)")
# the jobs BENCHMARKS.md gives commands for (each must keep parsing them)
DOCUMENTED = ["bench_cache", "bench_compile", "bench_fkdiff", "bench_fkdiff_efficiency",
              "bench_infer", "bench_kd", "bench_loader"]  # fmt: skip


def documented_commands() -> list[tuple[str, list[str]]]:
    """(job, arguments) of every ``python jobs/bench_*.py ...`` in BENCHMARKS.md and the jobs'
    docstrings, placeholders (``[CONFIG.yaml]``, ``[key=value]``) left out."""
    texts = [(ROOT / "BENCHMARKS.md").read_text()]
    texts += [(ROOT / "jobs" / f"{job}.py").read_text().split('"""')[1] for job in JOBS]
    found = []
    for text in texts:
        for job, args in COMMAND.findall(text.replace("\\\n", " ")):
            argv = shlex.split(args, comments=True)
            if not any(a.startswith("[") for a in argv):
                found.append((job, argv))
    return found


def test_every_bench_job_is_a_bench_job():
    assert set(DOCUMENTED) <= set(JOBS)
    for job in JOBS:
        module = load_job(job)
        assert isinstance(module.JOB, BenchJob) and module.main == module.JOB.main, job


@pytest.mark.parametrize("job", JOBS)
def test_help_prints_the_docstring_and_runs_nothing(job, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = load_job(job)
    assert module.main(["--help"]) == {}
    assert capsys.readouterr().out == module.__doc__ + "\n"
    assert list(tmp_path.iterdir()) == []


def test_documented_commands_parse():
    commands = documented_commands()
    assert set(DOCUMENTED) <= {job for job, _ in commands}
    for job, argv in commands:
        parsed = load_job(job).JOB.parse(argv)
        if job == "bench_cache":  # its own keys, the rest override the TAD-SR config
            opts, overrides = parsed
            assert overrides == [] and {a.split("=")[0] for a in argv} <= set(opts), argv
        elif dataclasses.is_dataclass(parsed):
            for arg in argv:  # every top-level key=value landed in the config
                key, value = arg.split("=", 1)
                if "." not in key and not value.startswith("["):
                    assert str(getattr(parsed, key)) == value, (job, arg)
