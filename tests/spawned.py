"""Groups of spawned processes (``torch.multiprocessing.start_processes(..., join=False)``) that
the tests wait on with a deadline and never leave behind."""

from __future__ import annotations

import time

from tests.ports import patience


def kill_group(group) -> None:
    for proc in group.processes:
        if proc.is_alive():
            proc.kill()


def join_group(group, seconds: float, what: str) -> None:
    """Wait for every process (``patience(seconds)`` at most); a process that fails raises with
    its traceback. Whatever still runs at the end is killed."""
    deadline = time.monotonic() + patience(seconds)
    try:
        while not group.join(timeout=1):
            assert time.monotonic() < deadline, f"{what} did not finish in time"
    finally:
        kill_group(group)
