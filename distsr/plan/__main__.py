"""``python -m distsr.plan CONFIG [key=value ...] --gpus N --gpu NAME [--mfu F] [--samples S]
[--json OUT]``: FLOPs, per-rank memory, bytes and GPU-hours of a run, without weights or GPUs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distsr.config import ConfigError
from distsr.plan.hardware import DEFAULT_MFU, PEAK_TFLOPS
from distsr.plan.report import make_plan
from distsr.plan.table import format_plan


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distsr.plan", description=__doc__.split("\n")[0])
    p.add_argument("config", help="a config name in configs/ (e.g. tadsr_seesr) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=2")
    p.add_argument("--gpus", type=int, required=True, help="ranks (one GPU each)")
    p.add_argument("--gpu", required=True, choices=sorted(PEAK_TFLOPS), type=str.lower)
    p.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"assumed model FLOPs utilisation (default {DEFAULT_MFU})",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples to cache and store (default: max_steps x batch x gpus)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the plan here as JSON")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        print("error: --gpus must be >= 1 and --mfu in (0, 1]", file=sys.stderr)
        return 2
    try:
        plan = make_plan(args.config, args.overrides, args.gpus, args.gpu, args.mfu, args.samples)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
