"""Servers the tests start (Ray nodes, SLURM daemons, a gloo group): their ports and deadlines.

A port found free can be taken by another process before the server binds it. So a server is
started on candidate ports (``free_ports``) and counted as up only once its own readiness signal
holds AND every port it was given is listened on by one of its own processes (``owners``,
from ``/proc/net/tcp*`` and the processes' socket descriptors). If it exits first, or another
process listens on one of its ports, it is stopped and started again on new ports, at most
``ATTEMPTS`` times (``start_on_free_ports``).

Deadlines on real signals are ``patience(seconds)``: a generous base for an idle 2-core machine,
times ``DISTSR_TEST_TIME_SCALE`` (default 1) for slower or busier machines.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ATTEMPTS = 3
TIME_SCALE = float(os.environ.get("DISTSR_TEST_TIME_SCALE", "1"))


def patience(seconds: float) -> float:
    """A deadline of ``seconds`` on this machine, scaled by ``DISTSR_TEST_TIME_SCALE``."""
    return seconds * TIME_SCALE


def free_ports(n: int) -> list[int]:
    """``n`` distinct candidate ports, free now (all held open while choosing, so none repeats);
    a server given them must be checked to have bound them (``start_on_free_ports``)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _listening(port: int) -> set[int]:
    """Socket inodes in LISTEN state on ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
    return pids


def _sockets(pids: Iterable[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def owners(pids: Iterable[int], ports: Iterable[int]) -> dict[int, str]:
    """Per port: "ours" (listened on by one of ``pids``), "taken" (by another process) or
    "free" (nobody listens yet)."""
    listening = {port: _listening(port) for port in ports}  # before the descriptors: no race
    ours = _sockets(pids)
    return {port: "ours" if inodes & ours else "taken" if inodes else "free"
            for port, inodes in listening.items()}  # fmt: skip


def wait_bound(proc: subprocess.Popen, ports: list[int], ready: Callable[[], bool], what: str,
               timeout: float) -> str | None:  # fmt: skip
    """Wait until ``ready()`` and ``proc``'s process group listens on every port: None; or why
    not (``proc`` exited, another process holds a port); RuntimeError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        state = owners(group_pids(proc.pid), ports)
        taken = [port for port, who in state.items() if who == "taken"]
        if taken:
            return f"port(s) {taken} taken by another process"
        if all(who == "ours" for who in state.values()) and ready():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} ({state})")
        time.sleep(0.5)


def start_on_free_ports(n: int, start: Callable[[list[int]], subprocess.Popen],
                        ready: Callable[[list[int]], bool], stop: Callable, what: str,
                        timeout: float) -> tuple[subprocess.Popen, list[int]]:  # fmt: skip
    """``start(ports)``: a server leading its own process group, on ``n`` free ports; returns
    ``(process, ports)`` once ``ready(ports)`` and it listens on all of them. Started again on
    new ports (``stop(process, ports)`` first) when it exits or loses a port to another process."""
    problems = []
    for _ in range(ATTEMPTS):
        ports = free_ports(n)
        proc = start(ports)
        try:
            problem = wait_bound(proc, ports, functools.partial(ready, ports), what, timeout)
        except BaseException:
            stop(proc, ports)
            raise
        if problem is None:
            return proc, ports
        stop(proc, ports)
        problems.append(f"ports {ports}: {problem}")
    raise RuntimeError(f"{what} failed {ATTEMPTS} times: {'; '.join(problems)}")
