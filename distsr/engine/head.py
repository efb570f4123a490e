"""The driver's watch on the Ray head: a lost head (its GCS, the cluster's control plane, gone)
stops the run with a message that says how to resume, instead of Ray's own exit (an
``ActorUnavailableError`` from the dead controller, or a 60 s wait for the GCS and an exit that
names no checkpoint). Plain sockets and threads; ``ray_adapter`` passes the GCS address."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

# The run raised and the GCS stays unreachable this long: the head is gone.
HEAD_LOST_AFTER_S = 5.0
# The run blocks and the GCS has not answered this long: stop before Ray's own driver exit at
# 60 s (``gcs_rpc_server_reconnect_timeout_s``), which names no checkpoint. Not sooner: with GCS
# fault tolerance (an external Redis) a restarted head may come back within that time.
HEAD_SILENT_LIMIT_S = 50.0
HEAD_LOST_EXIT = 75  # EX_TEMPFAIL: launch the same command again once a head is back


def alive(address: str, timeout: float = 2.0) -> bool:
    """The GCS at ``address`` (``host:port``) accepts a connection."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def lost(address: str, interval: float = 1.0) -> bool:
    """The GCS does not answer for ``HEAD_LOST_AFTER_S`` (asked after an error of the run)."""
    deadline = time.monotonic() + HEAD_LOST_AFTER_S
    while time.monotonic() < deadline:
        if alive(address):
            return False
        time.sleep(interval)
    return True


def exit_lost(message: Callable[[], str]) -> None:
    """Stop this driver with ``message()`` and ``HEAD_LOST_EXIT``, skipping Ray's shutdown (it
    would wait on the lost GCS)."""
    print(message(), file=sys.stderr, flush=True)
    os._exit(HEAD_LOST_EXIT)


@contextlib.contextmanager
def watch(address: str, message: Callable[[], str], interval: float = 2.0) -> Iterator[None]:
    """For the with-block: when it raises (Ray's controller died with the head) and the GCS at
    ``address`` stays unreachable for ``HEAD_LOST_AFTER_S``, or it blocks while the GCS has not
    answered for ``HEAD_SILENT_LIMIT_S``, stop the driver with ``message()`` (``exit_lost``).
    Workers on other nodes lose the GCS too and stop."""
    stop = threading.Event()

    def poll() -> None:
        lost_since = None
        while not stop.wait(interval):
            if alive(address):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= HEAD_SILENT_LIMIT_S:
                exit_lost(message)

    threading.Thread(target=poll, name="distsr-head-watch", daemon=True).start()
    try:
        yield
    except Exception:
        if lost(address):
            exit_lost(message)
        raise
    finally:
        stop.set()
