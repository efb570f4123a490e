"""Evaluate super-resolution predictors: pyiqa metrics, efficiency, tables and image grids.

    python -m distsr.evaluate --gt HR_DIR [--student RUN] [--teacher RUN] --out eval/
    python -m distsr.evaluate --lq LR_DIR --gt HR_DIR ...     # LR/HR pairs matched by file stem
    python -m distsr.evaluate --lq LR_DIR ...                 # no gt: no-reference metrics only
    python -m distsr.evaluate --student RUN --teacher RUN     # held-out photos, as the demo

Without ``--gt`` and ``--lq`` the HR images are the demo's: centre crops (128^2) of the held-out
bundled photos (``bundled:eval``, which no shard of ``inputs=[bundled]`` is made from), written
to ``OUT/eval_hr``. With only ``--gt``, lq is made from each HR image (cropped to a multiple of
the scale) by the configured degradation (``--degradation bicubic|realesrgan`` or
``--degradation-config YAML`` holding a ``DegradationConfig``) with the seed
``stable_seed(--seed, stem)``, so every run sees the same lq. Predictors: bicubic always,
the one-step student (``--student``) and the T-step teacher (``--teacher``) when given. Metrics:
see ``distsr.evaluate.metrics`` (PSNR/SSIM on Y of YCbCr; learned ones only when their weight
files are on disk, never downloaded). sr is rounded to 8 bits before it is scored, as saved
images are.

Outputs in ``--out``: ``report.md``, ``metrics.json``, ``grids/<image>.png`` (lq | bicubic |
teacher | student | gt, and a zoomed crop row). Efficiency: parameters, sampling steps, seconds
per image (on a GPU after one untimed warm-up call per network) and peak memory: the most a
call needed on top of what was allocated before it (weights excluded; on a GPU the caching
allocator's statistics, on the CPU the growth of the resident set with freed memory handed back
first; see ``distsr.evaluate.memory``), the largest over the images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distsr.data.imageio import list_images, read_image, to_tensor, to_uint8, write_image
from distsr.evaluate.memory import peak_meter
from distsr.evaluate.metrics import DEFAULT_METRICS, build_metrics, nanmean
from distsr.evaluate.report import make_grid, write_report
from distsr.inference.predictors import Bicubic, load_predictor
from distsr.inference.tiling import upscale_tiled


def _as_image(x) -> np.ndarray:
    """uint8 HWC array, or a float tensor [3,h,w] / [1,3,h,w] in [0, 1] -> uint8 HWC."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"images must be HxWx3 uint8, got {x.dtype} {x.shape}")
        return x
    return to_uint8(x)


class _Meter:
    """Seconds and peak memory of predictor calls (``distsr.evaluate.memory``)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.cuda = torch.cuda.is_available()
        self.memory = peak_meter(device)
        self.kind = self.memory.kind
        self.seconds: dict[str, list[float]] = {}
        self.peak: dict[str, float] = {}

    def run(self, name: str, fn, lq: torch.Tensor, timed: bool = True) -> torch.Tensor:
        mem = self.memory.start()
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sr = fn(lq)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = self.memory.stop(mem)
        if timed:
            self.seconds.setdefault(name, []).append(seconds)
        if peak is not None:
            self.peak[name] = max(self.peak.get(name, 0.0), peak)
        return sr


def _caller(fn, tile: int | None, overlap: int):
    if not tile:
        return fn
    return lambda lq: upscale_tiled(fn, lq, fn.scale, tile, overlap)


def _score(metrics, sr: np.ndarray, gt: np.ndarray | None) -> dict[str, float]:
    scores = {}
    sr_t, gt_t = to_tensor(sr)[None], None if gt is None else to_tensor(gt)[None]
    for metric in metrics:
        if metric.full_reference and gt is None:
            continue
        try:
            scores[metric.name] = metric(sr_t, gt_t)[0]
        except Exception as err:  # a metric failing on one image must not end the run
            tqdm.write(f"{metric.name} failed on an image: {err}", file=sys.stderr)
            scores[metric.name] = float("nan")
    return scores


def _label(name: str, fn) -> str:
    steps = getattr(fn, "steps", 0)
    return f"{name} ({steps} step{'s' if steps != 1 else ''})" if steps else name


def _evaluate_image(name, lq, gt, predictors, metrics, meter, call, out_dir, grids, save):
    lq_t = to_tensor(lq)[None]
    scores, columns = {}, [("lq", lq)]
    for pname, fn in predictors.items():
        sr = to_uint8(meter.run(pname, call[pname], lq_t))
        if gt is not None and sr.shape != gt.shape:
            raise ValueError(f"{name}: {pname} gave sr {sr.shape}, but gt is {gt.shape}")
        scores[pname] = _score(metrics, sr, gt)
        columns.append((_label(pname, fn), sr))
        if save:
            write_image(out_dir / "images" / pname / f"{name}.png", sr)
    if gt is not None:
        columns.append(("gt", gt))
    grid = None
    if grids:
        grid = out_dir / "grids" / f"{name}.png"
        write_image(grid, make_grid(columns))
    return scores, grid


def evaluate(
    predictors: dict,
    pairs: list[tuple],
    metrics=None,
    out_dir: str | Path = "eval",
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    crop_border: int = 0,
    tile: int | None = None,
    overlap: int = 32,
    grids: bool = True,
    save_images: bool = False,
    warmup: bool = True,
    info: dict | None = None,
    skipped_images: dict | None = None,
) -> dict:
    """Score ``predictors`` (name -> ``fn(lq) -> sr``) on ``pairs`` of (name, lq, gt or None);
    lq/gt are HxWx3 uint8 arrays or float tensors in [0, 1]. ``metrics``: names from
    ``distsr.evaluate.metrics.METRICS`` (default: all, those without weight files skipped). Writes
    ``report.md``, ``metrics.json`` and grids into ``out_dir``; returns the JSON dict."""
    if not predictors or not pairs:
        raise ValueError("evaluate needs at least one predictor and one (name, lq, gt) pair")
    names = [pair[0] for pair in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"image names must be unique, got {names}")
    out_dir = Path(out_dir)
    pairs = [(n, _as_image(lq), None if gt is None else _as_image(gt)) for n, lq, gt in pairs]
    has_gt = any(gt is not None for _, _, gt in pairs)
    metric_names = list(DEFAULT_METRICS if metrics is None else metrics)
    built, skipped = build_metrics(
        metric_names, device=device, weights_dir=weights_dir, full_reference=has_gt,
        crop_border=crop_border,
    )  # fmt: skip
    for msg in skipped.values():
        print(msg, file=sys.stderr)
    meter = _Meter(device)
    call = {name: _caller(fn, tile, overlap) for name, fn in predictors.items()}
    if warmup:  # CUDA context, kernels, allocator caches and CPU thread pools come up lazily
        lq = to_tensor(pairs[0][1])[None]
        lq = lq if meter.cuda else lq[..., :16, :16]  # on the CPU a small call is enough
        for name, fn in predictors.items():
            if getattr(fn, "steps", 0):
                meter.run(name, call[name], lq, timed=False)
    images, grid_paths = {}, []
    for name, lq, gt in tqdm(pairs, desc="evaluate", unit="img"):
        images[name], grid = _evaluate_image(
            name, lq, gt, predictors, built, meter, call, out_dir, grids, save_images
        )
        grid_paths += [str(grid)] if grid else []
    info = {"psnr/ssim": f"Y of BT.601 YCbCr, 8-bit sr, crop border {crop_border}", **(info or {})}
    result = _result(predictors, built, skipped, meter, images, info)
    result["grids"] = grid_paths
    result["skipped_images"] = dict(skipped_images or {})
    write_report(result, out_dir)
    return result


def _result(predictors, metrics, skipped, meter, images, info) -> dict:
    table = {}
    for pname, fn in predictors.items():
        seconds = meter.seconds.get(pname, [])
        mean = {m.name: nanmean([images[i][pname].get(m.name) for i in images]) for m in metrics}
        table[pname] = {
            "steps": getattr(fn, "steps", None),
            "params": getattr(fn, "num_params", None),
            "seconds_per_image": sum(seconds) / len(seconds) if seconds else None,
            "peak_memory_mib": meter.peak.get(pname),
            "mean": mean,
        }
    return {
        "info": info,
        "metrics": [
            {"name": m.name, "lower_better": m.lower_better, "full_reference": m.full_reference}
            for m in metrics
        ],
        "skipped_metrics": skipped,
        "memory_kind": meter.kind,
        "predictors": table,
        "images": images,
    }


# ---------------------------------------------------------------- loading image sets


def _read_all(paths: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    images, bad = {}, {}
    for path in paths:
        try:
            images[path.stem] = read_image(path)
        except ValueError as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
            bad[str(path)] = str(err)
    return images, bad


def hr_pairs(gt_dir, degradation, seed: int = 0):
    """(pairs, skipped): lq made from every HR image (cropped to a multiple of the scale)."""
    from distsr.data.degradation import degrade
    from distsr.seeding import stable_seed

    images, bad = _read_all(list_images(gt_dir, recursive=False))
    s = degradation.scale
    pairs = []
    for stem, gt in images.items():
        gt = gt[: gt.shape[0] // s * s, : gt.shape[1] // s * s]
        lq, _ = degrade(gt, degradation, stable_seed(seed, stem))
        pairs.append((stem, lq, gt))
    return pairs, bad


def paired(lq_dir, gt_dir, scale: int):
    """(pairs, skipped): LR/HR files matched by stem; gt cropped to lq x scale."""
    lqs, bad = _read_all(list_images(lq_dir, recursive=False))
    gts, bad_gt = _read_all(list_images(gt_dir, recursive=False))
    bad.update(bad_gt)
    common = [stem for stem in lqs if stem in gts]
    if not common:
        raise ValueError(f"no file stem appears in both {lq_dir} and {gt_dir}")
    for stem in sorted(set(lqs) ^ set(gts)):
        print(f"skipped {stem}: no matching file in the other folder", file=sys.stderr)
        bad[stem] = "no matching lq/gt file"
    pairs = []
    for stem in common:
        lq, gt = lqs[stem], gts[stem]
        h, w = lq.shape[0] * scale, lq.shape[1] * scale
        if not (h <= gt.shape[0] < h + scale and w <= gt.shape[1] < w + scale):
            raise ValueError(
                f"{stem}: gt is {gt.shape[1]}x{gt.shape[0]}, expected lq x{scale} = {w}x{h}"
            )
        pairs.append((stem, lq, gt[:h, :w]))
    return pairs, bad


def lq_only(lq_dir):
    images, bad = _read_all(list_images(lq_dir, recursive=False))
    return [(stem, lq, None) for stem, lq in images.items()], bad


# ---------------------------------------------------------------- command line


def held_out(out: Path) -> Path:
    """The demo's HR images: centre crops (its default ``eval_size``) of the held-out bundled
    photos, which no shard of ``inputs=[bundled]`` is made from, written to ``out/eval_hr``."""
    from distsr.demo import DemoConfig, held_out_photos

    size = DemoConfig.eval_size
    folder = held_out_photos(out / "eval_hr", size)
    print(f"no --gt or --lq: HR images are {size}^2 crops of the held-out photos in {folder}")
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distsr.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--gt", help="folder of HR images (alone: lq made by --degradation; "
                   "without --lq: OUT/eval_hr, crops of the held-out bundled photos)")  # fmt: skip
    p.add_argument("--lq", help="folder of LR images (with --gt: pairs by stem; alone: NR only)")
    p.add_argument("--out", default="eval", help="output folder (default: eval)")
    p.add_argument("--student", help="run folder (or weights file) of the one-step student")
    p.add_argument("--student-config", help="config.yaml when --student is a weights file")
    p.add_argument("--teacher", help="run folder (or weights file) of the T-step teacher")
    p.add_argument("--teacher-config", help="config.yaml when --teacher is a weights file")
    p.add_argument("--predictor", action="append", default=[], metavar="NAME=RUN",
                   help="another student's run folder, a row NAME (repeatable)")  # fmt: skip
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--sampler", choices=("stochastic", "deterministic"), default="stochastic")
    p.add_argument("--scale", type=int, help="default: the student's/teacher's scale, else 4")
    p.add_argument("--degradation", choices=("bicubic", "realesrgan"), default="bicubic")
    p.add_argument("--degradation-config", help="YAML mapping of DegradationConfig fields")
    p.add_argument("--seed", type=int, default=0, help="degradation and latent-noise seed")
    p.add_argument("--metrics", help=f"comma list (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--weights-dir", help="torch hub folder with the metric weights "
                   "(default $TORCH_HOME/hub: pyiqa/, checkpoints/, clip/)")  # fmt: skip
    p.add_argument("--crop-border", type=int, default=0, help="pixels cropped for PSNR/SSIM")
    p.add_argument("--tile", type=int, help="tile size in lq pixels (default: whole images)")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-grids", action="store_true")
    p.add_argument("--save-images", action="store_true", help="also write every sr image")
    return p


def _degradation(args, scale: int):
    from distsr.config import from_dict, load_yaml
    from distsr.data.config import DegradationConfig

    if args.degradation_config:
        path = Path(args.degradation_config)
        cfg = from_dict(DegradationConfig, load_yaml(path), source=str(path))
    else:
        cfg = DegradationConfig(kind=args.degradation, scale=scale)
    if cfg.scale != scale:
        raise ValueError(f"degradation scale {cfg.scale} differs from the predictors' {scale}")
    return cfg


def _predictors(args, device) -> dict:
    which = "raw" if args.raw else "ema"
    nets = {}
    if args.teacher:
        nets["teacher"] = load_predictor(
            args.teacher, which, "all", config=args.teacher_config, device=device,
            seed=args.seed, sampler=args.sampler,
        )  # fmt: skip
    if args.student:
        nets["student"] = load_predictor(
            args.student, which, "one", config=args.student_config, device=device, seed=args.seed
        )
    for spec in args.predictor:
        name, _, run = spec.partition("=")
        if not name or not run or name in ("bicubic", *nets):
            raise ValueError(f"--predictor takes a new NAME=RUN_FOLDER, got {spec!r}")
        nets[name] = load_predictor(run, which, "one", device=device, seed=args.seed)
    scales = {fn.scale for fn in nets.values()} | ({args.scale} if args.scale else set())
    if len(scales) > 1:
        raise ValueError(f"predictors and --scale disagree on the scale: {sorted(scales)}")
    scale = scales.pop() if scales else 4
    return {"bicubic": Bicubic(scale), **nets}, scale


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except (FileNotFoundError, ValueError) as err:  # user mistakes: one clear line, no trace
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.gt and not args.lq:
        args.gt = str(held_out(Path(args.out)))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictors, scale = _predictors(args, device)
    info = {"scale": scale, "seed": args.seed, "device": str(device)}
    if args.gt and args.lq:
        pairs, bad = paired(args.lq, args.gt, scale)
        info["mode"] = f"LR/HR pairs ({args.lq}, {args.gt})"
    elif args.gt:
        degradation = _degradation(args, scale)
        pairs, bad = hr_pairs(args.gt, degradation, args.seed)
        info["mode"] = f"HR folder {args.gt}, lq by {degradation.kind} x{scale} degradation"
        info["lq seeds"] = f"stable_seed({args.seed}, stem)"
    else:
        pairs, bad = lq_only(args.lq)
        info["mode"] = f"LR only {args.lq} (no-reference metrics)"
    if not pairs:
        raise ValueError("no readable image to evaluate")
    metrics = args.metrics.split(",") if args.metrics else None
    result = evaluate(
        predictors, pairs, metrics, args.out, device=device, weights_dir=args.weights_dir,
        crop_border=args.crop_border, tile=args.tile, overlap=args.overlap,
        grids=not args.no_grids, save_images=args.save_images, info=info, skipped_images=bad,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'} and metrics.json ({len(result['images'])} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
