"""What every ``jobs/bench_*.py`` shares, defined once: the command line (``[CONFIG.yaml]
[key=value ...]``, ``-h``/``--help`` prints the job's docstring, a bad key or a missing file is
one ``error:`` line), the ``threads`` key (torch CPU threads for the run, 0 = torch's default)
and the outputs (``OUTPUT/<name>.json`` next to the table as ``OUTPUT/<name>.md``)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distsr.config import load_job_config

HELP = ("-h", "--help")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class BenchJob:
    """One benchmark command: ``parse`` (argv -> what ``bench`` takes), ``bench`` (-> the result
    ``main`` returns) and ``show`` (prints ``(parsed, result)``); ``log_level`` None: the job
    sets up no logging."""

    doc: str
    parse: Callable[[list[str]], Any]
    bench: Callable[[Any], Any]
    show: Callable[[Any, Any], None]
    log_level: int | None = logging.INFO

    def main(self, argv: list[str] | None = None) -> Any:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv and argv[0] in HELP:
            print(self.doc)
            return {}
        parsed = self.parse(argv)
        result = self.bench(parsed)
        self.show(parsed, result)
        return result

    def run(self) -> None:
        """The ``__main__`` block: logging, then ``main`` with config errors as one line."""
        if self.log_level is not None:
            logging.basicConfig(level=self.log_level, format=LOG_FORMAT)
        try:
            self.main()
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")


def keys_of(config: type) -> Callable[[list[str]], Any]:
    """``[CONFIG.yaml] [key=value ...]`` -> a validated ``config`` (``config.load_job_config``)."""
    return functools.partial(load_job_config, config)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (0: leave torch's default); restored after."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def write_report(out: Path, name: str, record: dict, table: str | None, indent: int = 2) -> None:
    """``out/<name>.json`` (``record``) and, given a ``table``, ``out/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=indent))
    if table is not None:
        (out / f"{name}.md").write_text(table)
