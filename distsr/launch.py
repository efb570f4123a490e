"""``python -m distsr.launch RECIPE_OR_YAML [key=value ...] [--dry-run]``

Connects to the Ray cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), otherwise
starts a private local Ray cluster sized to this machine — it never attaches silently to a
cluster it was not pointed at. ``scaling.ray=false`` runs the same loop in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import socket
import sys
from collections.abc import Iterator

import yaml

from distsr.config import ConfigError, planning_without_files
from distsr.runconfig import (
    RunConfig,
    check_output_dir,
    load_run_config,
    to_dict,
    write_run_record,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distsr.launch", description=__doc__.split("\n")[0])
    p.add_argument("config", help="a config name in configs/ (e.g. tadsr_seesr) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. engine.zero_stage=2")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the DeepSpeed JSON and exit (weight files named in "
        "the config may be absent: they are listed as missing)",
    )
    return p.parse_intermixed_args(argv)  # --dry-run before or after the overrides


def dry_run(cfg: RunConfig, missing: list[tuple[str, str]]) -> None:
    from distsr.engine.deepspeed_config import deepspeed_config

    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print("# DeepSpeed config (per trainable engine)")
    ds = deepspeed_config(cfg.engine, cfg.data.batch_size, cfg.scaling.max_workers)
    print(json.dumps(ds, indent=2))
    if missing:
        print("\n# missing files (needed where the job runs; a launch without --dry-run refuses)")
        for key, msg in missing:
            print(f"#   {key}: {msg}")


@contextlib.contextmanager
def ray_session(num_cpus: int, tag: str = "distsr") -> Iterator[None]:
    """Ray for the with-block: the session this process already has, the cluster at
    ``RAY_ADDRESS``, or a new private local cluster (shut down at the end), never another one.

    The private cluster names its own address: the GCS port is chosen here and ``RAY_ADDRESS``
    points at it for every process of the cluster. Ray 2.60's ``PlacementGroupCleaner`` (added in
    ray-project/ray PR #58515) looks its controller up without an address, so without this it
    falls back to ``/tmp/ray/ray_current_cluster`` — the last ``ray start`` on the machine, often
    another or a dead cluster — times out on that GCS and prints tracebacks after a successful
    run (its loop catches only ``RayStateApiException``). Its token is its own
    (:func:`private_cluster_env`): nothing is written into the user's home."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        session, init = contextlib.nullcontext(), {"address": address}
        where = f"the cluster at RAY_ADDRESS={address}"
    else:
        port = _free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        session = private_cluster_env(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=address)
        init = {"address": "local", "num_cpus": max(os.cpu_count() or 1, num_cpus)}
        where = "a new local Ray cluster (set RAY_ADDRESS to use another)"
    with session:
        ray.init(**init)
        resources = ray.cluster_resources()
        print(f"[{tag}] running on {where}: {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs", flush=True)  # fmt: skip
        try:
            yield
        finally:
            ray.shutdown()


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextlib.contextmanager
def private_cluster_env(**extra: str) -> Iterator[None]:
    """``os.environ`` for a private local cluster started in the with-block (``ray.init()``
    without an address), restored at the end: ``extra`` and token authentication with a fresh
    token of its own in ``RAY_AUTH_TOKEN``, which every process of the cluster inherits.

    Without it ``ray.init()`` turns token authentication on and, finding no token, writes one to
    ``~/.ray/auth_token``; from then on a plain ``ray start --head`` on this machine turns
    authentication on too, and a client without ``RAY_AUTH_MODE=token`` fails with an
    ``AuthenticationError``. The private cluster's token is in no file and dies with it."""
    keys = (*AUTH_ENV, *extra)
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **extra)
    _reload_auth()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_auth()


def _reload_auth() -> None:
    """Make this process's Ray see the changed ``RAY_AUTH_*`` variables: it caches the mode (in
    its config) and the token (config first, as Ray's own tests reset them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def run(cfg: RunConfig) -> dict:
    """Train ``cfg`` on Ray Train (``scaling.ray``) or in this process; returns final metrics."""
    if not cfg.scaling.ray:
        from distsr.engine.checkpoint import LocalStore
        from distsr.engine.context import init_in_process
        from distsr.engine.loop import train_worker

        store = LocalStore(cfg.run_dir, cfg.engine.checkpoint.keep)
        return train_worker(cfg, init_in_process(), store)
    from distsr.engine.ray_adapter import fit

    needed = math.ceil(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker)
    with ray_session(needed):
        result = fit(cfg)
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config == "demo":
        from distsr.demo import main as demo

        return demo(args.overrides)
    try:
        # a dry run plans a job on a machine without the weights: absent files are only listed
        plan = planning_without_files() if args.dry_run else contextlib.nullcontext([])
        with plan as missing:
            cfg = load_run_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg, missing)
            return 0
        check_output_dir(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = write_run_record(cfg, ["python", "-m", "distsr.launch", *(argv or sys.argv[1:])])
    print(f"[distsr] run folder: {run_dir}", flush=True)
    metrics = run(cfg)
    print(f"[distsr] finished at step {metrics.get('step')}; run folder: {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
