"""Upscale images with a one-step student, or export it in its official format.

    python -m distsr.upscale --checkpoint RUN_DIR INPUT OUTPUT [--tile 256 --overlap 32]
    python -m distsr.upscale --checkpoint WEIGHTS.safetensors --config RUN/config.yaml IN OUT
    python -m distsr.upscale export --checkpoint RUN_DIR OUT.pth [--raw]     # ResShift student
    python -m distsr.upscale export --checkpoint RUN_DIR OUT_DIR [--raw]     # SeeSR student
    python -m distsr.upscale export --format onnx --checkpoint RUN_DIR OUT.onnx [--dtype fp16]
    python -m distsr.upscale --checkpoint OUT.onnx INPUT OUTPUT               # via onnxruntime
    python -m distsr.upscale export --checkpoint RUN_DIR OUT.pth [--raw]     # FKdiff FASRer

INPUT is an image or a folder of images; OUTPUT is an image path (single input) or a folder
(``<stem>.png`` per input). Large images are upscaled in overlapping tiles of ``--tile`` lq
pixels (see ``distsr.inference.tiling``; a SeeSR student tiles its latent, ``--tile`` x scale / 8
latents, with Gaussian blending). Unreadable inputs are reported and skipped; the exit status is
1 when any input was skipped.

The run's student spec picks the predictor and the export (``inference.predictors.family``).

SeeSR: ``export`` writes ``OUT_DIR/unet`` and ``OUT_DIR/controlnet``, diffusers folders
(config.json naming the stock class + diffusion_pytorch_model.safetensors, float32) in the
layout of the SeeSR release, so the official SeeSR scripts take OUT_DIR as ``--seesr_model_path``
(with the SD-2-base folder and RAM/DAPE weights the run used, listed in ``OUT_DIR/export.yaml``).
The official script runs its 50-step sampler; the student is meant to take one step at t = 999
from the LR latent noised at t = 999, as ``distsr.inference.seesr`` does.

ResShift: ``export`` writes the student UNet as a plain state_dict (every key of the official
``UNetModelSwin``, buffers included, float32) with ``torch.save``: the official loader
(``sampler.BaseSampler.load_model`` -> ``utils/util_net.reload_model``) reads it as is. Next to it,
``OUT.yaml`` holds the official ``model`` and ``diffusion`` config sections that fit the weights.
Note: the official sampler runs the chain of the ``diffusion`` section (``steps``); a one-step
student is meant to be run with one step from the prior, as ``distsr.inference.predictors`` does.

ONNX (``--format onnx``, ResShift, single-pass SR and FASRer students): the student end to end
as one graph, checked against PyTorch with onnxruntime before it is written
(``upscale.onnx_export``).
``--checkpoint OUT.onnx`` upscales with it through onnxruntime, with the same tiling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from distsr.data.config import IMAGE_EXTENSIONS
from distsr.data.imageio import list_images, read_image, to_tensor, to_uint8, write_image
from distsr.inference.predictors import family, load_predictor, load_student, resshift_unet
from distsr.inference.tiling import RAMPS, upscale_tiled
from distsr.upscale.onnx_export import export_onnx


def output_paths(inputs: list[Path], input_arg: Path, output: Path) -> list[Path]:
    """One output per input: OUTPUT itself for a single image file with an image suffix,
    else ``OUTPUT/<stem>.png``."""
    if input_arg.is_file() and output.suffix.lower() in IMAGE_EXTENSIONS:
        return [output]
    return [output / f"{p.stem}.png" for p in inputs]


def upscale_images(predictor, pairs, tile: int, overlap: int, ramp: str) -> list[tuple]:
    """Upscale every (input, output) pair; returns (path, error) of the skipped inputs."""
    skipped = []
    tiles = tqdm(desc="tiles", leave=False, unit="tile")
    for src, dst in tqdm(pairs, desc="upscale", unit="img"):
        try:
            lq = to_tensor(read_image(src))[None]
        except ValueError as err:
            tqdm.write(f"skipped {src}: {err}", file=sys.stderr)
            skipped.append((src, str(err)))
            continue
        sr = upscale_tiled(predictor, lq, predictor.scale, tile, overlap, ramp, progress=tiles)
        write_image(dst, to_uint8(sr))
    tiles.close()
    return skipped


def official_unet_params(unet: dict) -> dict:
    """The UNet kwargs the official ``UNetModelSwin`` takes: distsr's ``norm_groups`` is left out
    at the official 32; any other value cannot be rebuilt there, so the export refuses it."""
    params = {k: v for k, v in unet.items() if k != "norm_groups"}
    groups = unet.get("norm_groups", 32)
    if groups != 32:
        raise ValueError(
            f"this UNet normalises with norm_groups={groups}; the official UNetModelSwin is fixed "
            "at 32 groups, so the official code could not rebuild it (distsr's own .safetensors "
            "export loads it)"
        )
    return params


def official_config(method, out: Path) -> dict:
    """The official ``model`` / ``diffusion`` (and ``autoencoder``) sections for the export."""
    s = method.schedule
    diffusion = {
        "sf": method.scale,
        "schedule_name": s.kind,
        "schedule_kwargs": {"power": s.power},
        "etas_end": s.etas_end,
        "steps": s.steps,
        "min_noise_level": s.min_noise_level,
        "kappa": s.kappa,
        "weighted_mse": False,
        "predict_type": "xstart",
        "timestep_respacing": None,
        "scale_factor": 1.0,
        "normalize_input": True,
        "latent_flag": True,
    }
    sections = {
        "model": {
            "target": "models.unet.UNetModelSwin",
            "ckpt_path": str(out),
            "params": official_unet_params(method.unet),
        },
        "diffusion": {
            "target": "models.script_util.create_gaussian_diffusion",
            "params": diffusion,
        },
    }
    if method.autoencoder.kind == "vq_f4":
        sections["autoencoder"] = {"ckpt_path": method.autoencoder.checkpoint}
    return sections


def export_official(checkpoint, out, which: str = "ema", config=None) -> Path:
    """Write the run's student in the official format of its family (ResShift: ``OUT.pth`` +
    ``OUT.yaml``; SeeSR: the folder ``OUT`` with ``unet/`` and ``controlnet/``); returns OUT."""
    weights, spec, cfg_path = load_student(checkpoint, which, config=config)
    return EXPORTERS[family(spec, cfg_path)](weights, spec, cfg_path, Path(out))


def export_resshift(weights, method, cfg_path, out: Path) -> Path:
    """The student UNet as an official ResShift checkpoint (+ ``OUT.yaml``)."""
    if out.suffix not in (".pth", ".pt", ".ckpt"):
        raise ValueError(f"a ResShift student exports a torch checkpoint: OUT must end in .pth, "
                         f"got {out}")  # fmt: skip
    official = official_config(method, out)  # refuses what the official code cannot rebuild
    unet = resshift_unet(weights, method, cfg_path)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
             for k, v in unet.state_dict().items()}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    out.with_suffix(".yaml").write_text(yaml.safe_dump(official, sort_keys=False))
    return out


def export_seesr(weights, spec, cfg_path, out: Path) -> Path:
    """The student UNet + ControlNet as the SeeSR release's diffusers folders, written to a
    temp folder and renamed into place; an existing OUT is refused."""
    from distsr.teachers.seesr import load_seesr_denoiser

    if out.suffix in (".pth", ".pt", ".ckpt", ".safetensors"):
        raise ValueError(f"a SeeSR student exports a folder (unet/, controlnet/), got {out}")
    if out.exists():
        raise ValueError(f"{out} exists; export writes a new folder")
    student = load_seesr_denoiser(spec, weights)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.unet.save_folder(tmp / "unet")
    student.controlnet.save_folder(tmp / "controlnet")
    official = {
        "seesr_model_path": str(out),
        "pretrained_model_path": spec.sd2_dir,
        "ram_ft_path": spec.ram.dape,
        "ram_checkpoint": spec.ram.checkpoint,
        "student": {"weights": str(weights), "run_config": str(cfg_path),
                    "timestep": spec.student_timestep, "start_timestep": spec.start_timestep},
    }  # fmt: skip
    (tmp / "export.yaml").write_text(yaml.safe_dump(official, sort_keys=False))
    os.replace(tmp, out)
    return out


def export_sr(weights, student, cfg_path, out: Path) -> Path:
    """A single-pass SR student as the BasicSR-style ``{"params": state_dict}`` .pth (official
    key names: the official test scripts and ``models.sr.load_sr`` read it)."""
    from distsr.inference.sr_predictor import sr_predictor

    if out.suffix not in (".pth", ".pt"):
        raise ValueError(f"an SR student exports a torch checkpoint: OUT must end in .pth, "
                         f"got {out}")  # fmt: skip
    net = sr_predictor(weights, student, cfg_path).net  # loads strictly: a wrong file fails here
    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"params": state}, tmp)
    os.replace(tmp, out)
    return out


def export_fasrer(weights, student, cfg_path, out: Path) -> Path:
    """A FASRer student (FKdiff has no official code release) as a torch checkpoint
    ``{"params": FASRer, "prior": CFE_R + denoiser}`` (the prior diffusion that gives it Z_hat)
    and ``OUT.yaml`` with the FASRer, CFE and prior configs that rebuild them."""
    from dataclasses import asdict

    from distsr.inference.fkdiff import fasrer_predictor

    if out.suffix not in (".pth", ".pt"):
        raise ValueError(f"a FASRer student exports a torch checkpoint: OUT must end in .pth, "
                         f"got {out}")  # fmt: skip
    pred = fasrer_predictor(weights, student, cfg_path)  # strict loading: a wrong file fails
    state = {name: {k: v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()}
             for name, m in (("params", pred.net), ("prior", pred.prior))}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    teacher = student.teacher
    configs = {"fasrer": asdict(student.student), "cfe": asdict(teacher.cfe),
               "prior": asdict(teacher.prior)}  # fmt: skip
    out.with_suffix(".yaml").write_text(yaml.safe_dump(configs, sort_keys=False))
    return out


EXPORTERS = {"resshift": export_resshift, "seesr": export_seesr, "sr": export_sr,
             "fasrer": export_fasrer}  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, weights file, or .onnx (upscaling)")  # fmt: skip
    parser.add_argument("--config", help="run config.yaml (default: the run folder's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ema", dest="which", action="store_const", const="ema", default="ema",
                       help="EMA weights (default)")  # fmt: skip
    group.add_argument("--raw", dest="which", action="store_const", const="raw",
                       help="raw (non-EMA) weights")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distsr.upscale",
        description="Upscale an image or a folder with a one-step student "
        "(or: python -m distsr.upscale export --checkpoint RUN OUT.pth)",
    )
    _common(parser)
    parser.add_argument("input", help="image file or folder")
    parser.add_argument("output", help="output image (single input) or folder")
    parser.add_argument("--tile", type=int, default=256, help="tile size in lq pixels")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in lq pixels")
    parser.add_argument("--ramp", choices=RAMPS, default="cosine", help="overlap blend weights")
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    return parser


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distsr.upscale export",
        description="Export the student in its official format (ResShift: a .pth checkpoint; "
        "SeeSR: diffusers unet/ and controlnet/ folders), or with --format onnx as one ONNX "
        "graph checked against PyTorch with onnxruntime",
    )
    _common(parser)
    parser.add_argument("out", help="output .pth (ResShift) or folder (SeeSR), or .onnx")
    parser.add_argument("--format", choices=("official", "onnx"), default="official",
                        help="official (default) or a checked ONNX graph")  # fmt: skip
    parser.add_argument("--dtype", default="fp32", help="ONNX: fp32 (default) or fp16")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 17; FASRer 20)")
    parser.add_argument("--seed", type=int, default=0,
                        help="ONNX: seed of the check's noise (recorded in the file)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.format == "onnx":
        meta = export_onnx(args.checkpoint, args.out, args.which, args.config, args.dtype,
                           args.opset, args.seed)  # fmt: skip
        print(f"wrote {args.out} ({meta['distsr.dtype']}, opset {meta['distsr.opset']}, "
              f"max abs difference to PyTorch {meta['distsr.max_abs_diff']})")  # fmt: skip
        return 0
    out = export_official(args.checkpoint, args.out, args.which, args.config)
    if out.is_dir():
        print(f"wrote {out}/unet, {out}/controlnet and {out}/export.yaml")
    else:
        print(f"wrote {out} and {out.with_suffix('.yaml')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "export":
            return export_main(argv[1:])
        return upscale_main(argv)
    except (FileNotFoundError, ValueError) as err:  # user mistakes: one clear line, no trace
        print(f"error: {err}", file=sys.stderr)
        return 2


def upscale_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tile < 1 or not 0 <= args.overlap < args.tile:
        parser.error(
            f"need --tile >= 1 and 0 <= --overlap < --tile, got {args.tile}/{args.overlap}"
        )
    inputs = list_images(args.input, recursive=False)
    pairs = list(zip(inputs, output_paths(inputs, Path(args.input), Path(args.output))))
    predictor = load_predictor(
        args.checkpoint, args.which, "one", config=args.config, device=args.device, seed=args.seed
    )
    skipped = upscale_images(predictor, pairs, args.tile, args.overlap, args.ramp)
    print(f"wrote {len(pairs) - len(skipped)} image(s); skipped {len(skipped)} unreadable")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
