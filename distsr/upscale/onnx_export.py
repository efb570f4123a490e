"""ONNX export of a run's student, checked against PyTorch before it is written.

    python -m distsr.upscale export --format onnx --checkpoint RUN OUT.onnx [--dtype fp16]

The graph is the student's predictor (``inference.predictors``), so it computes what
``python -m distsr.upscale`` computes with the PyTorch weights:

* ResShift one-step students: inputs ``lq`` [B, 3, h, w] in [0, 1] and ``noise`` [B, C, h s / f,
  w s / f] (the prior's eps, standard normal, for the *unpadded* image: s the scale, f the first
  stage's factor, C its latent channels), output ``sr`` [B, 3, h s, w s] in [0, 1]. Inside: lq
  reflect-padded on the bottom/right to the multiple the UNet's windows need, bicubic x s, the
  first stage's encoder (VQ-f4 or pixels), z_T = z_y + kappa sqrt(eta_{T-1}) eps, one UNet call at
  t = T-1, the decoder (VQ-f4 quantises first), crop, clamp. The noise is an input so that a
  deployment can pick its own seed; ``python -m distsr.upscale`` feeds the seeded noise the
  PyTorch predictor draws, so both give the same image. lq sides must be at least the pad
  multiple (stored as ``distsr.multiple`` in the file's metadata).
* Single-pass SR students (DTKD / MTKD: SwinIR, EDSR, RCAN, SRMD, RRDBNet, SRVGG): ``lq`` ->
  ``sr``, clamped to [0, 1].
* FASRer students (FKdiff): ``lq`` and ``noise`` [T + 1, B, 4 C'] (z_T, then the step noises of
  the prior diffusion) -> ``sr``: CFE_R(lq), the T reverse steps of the prior denoiser, one FASRer
  pass (``inference.fkdiff``).

Batch, height and width are dynamic. Opset :data:`OPSETS` per family. ResShift and SR students
go through the TorchScript exporter (``torch.onnx.export(dynamo=False)``): the dynamo exporter
stops at the diffusion's checks of its timestep tensors. Shape-dependent Python branches are
traced on an input that needs padding, so the pad is part of the graph for every size (a zero
pad is the identity), and SwinIR's ``window_reverse`` is traced in a form that keeps the batch
dynamic. FASRer's FFTs have no TorchScript export: it goes through the dynamo exporter (opset
20, DFT), which takes far longer (about a minute for a tiny FASRer on a 2-core CPU).

``fp16`` converts the fp32 graph to float16 (weights, activations, inputs and outputs;
onnxruntime keeps the few ops it must in fp32). bf16 is refused: onnxruntime's CPU provider has
no bfloat16 Conv kernel (the graphs would not load there).

The check: onnxruntime (CPU) runs the graph on two inputs of different batch and size (one
without and one with padding), the PyTorch predictor (fp32) runs the same inputs, and the max
abs difference of the [0, 1] outputs is printed and held to :data:`BOUNDS` (fp32: 1e-4, fp16:
1e-2, about 2.5 8-bit levels). The file is written under a temporary name and moved into place
only when the check passes; otherwise :class:`OnnxCheckError` names both numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

# Opset per family (``inference.predictors.family``): FASRer's FFTs need DFT-20 through the
# dynamo exporter. SeeSR's student (UNet + ControlNet behind RAM, a text encoder and the SD
# VAE) is not exported.
OPSETS = {"resshift": 17, "sr": 17, "fasrer": 20}
DTYPES = ("fp32", "fp16")
BOUNDS = {"fp32": 1e-4, "fp16": 1e-2}  # max |onnxruntime - PyTorch fp32| on [0, 1] outputs
META = "distsr."  # prefix of the metadata keys written into the file
SWINIR_ARCH = "spandrel.architectures.SwinIR.__arch.SwinIR"


class OnnxCheckError(ValueError):
    """The exported graph does not reproduce the PyTorch student within the bound."""


class PredictorGraph(nn.Module):
    """The predictor's ``__call__`` as a module to trace: ``(lq[, noise]) -> sr``."""

    def __init__(self, predictor, module: nn.Module):
        super().__init__()
        self.module = module  # registered so that its weights become the graph's initializers
        self.predictor = predictor

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.predictor(*inputs)


class FASRerGraph(nn.Module):
    """``inference.fkdiff.FASRerPredictor`` with its noise as an input: ``(lq, noise [T + 1, B,
    4 C']) -> sr``: Z_hat from the prior's T reverse steps guided by CFE_R(lq), one FASRer pass."""

    def __init__(self, predictor):
        super().__init__()
        self.net, self.prior, self.schedule = predictor.net, predictor.prior, predictor.schedule

    def forward(self, lq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        z_hat = self.prior.sample(lq, noise, self.schedule)
        return self.net(lq, z_hat)[0].float().clamp(0, 1)


def graph_of(predictor, family: str) -> nn.Module:
    if family == "fasrer":
        return FASRerGraph(predictor).eval()
    module = predictor.model if family == "resshift" else predictor.net
    return PredictorGraph(predictor, module).eval()


def pad_multiple(predictor, family: str) -> int:
    """lq side multiple the predictor pads to (ResShift's ``multiple``, FASRer's, else SwinIR's
    window or 1)."""
    if family == "resshift":
        return int(predictor.multiple)
    if family == "fasrer":
        return int(predictor.net.size_multiple)
    return int(getattr(predictor.net, "window_size", 1))


def check_shapes(predictor, family: str) -> list[tuple[int, int, int]]:
    """(batch, h, w) of the traced input (first: needs padding on both sides, so the pad is in
    the graph) and of the second check input (another batch and size)."""
    m = pad_multiple(predictor, family)
    if family == "resshift":  # lq * scale must be divisible by the latent factor
        step = predictor.factor // math.gcd(predictor.factor, predictor.scale)
        return [(1, 2 * m + step, 3 * m + step), (2, 2 * m, m)]
    if family == "fasrer":  # dynamo: a batch of 1 would be specialised
        return [(2, m + 5, m + 3), (1, m, 2 * m)]
    m = max(m, 4)  # single-pass nets: sizes no multiple of 8 that differ from SwinIR's img_size
    return [(1, 4 * m + 5, 5 * m + 3), (2, 3 * m, 4 * m)]


def check_inputs(predictor, family: str, batch: int, h: int, w: int, seed: int) -> tuple:
    """The graph's inputs: seeded lq in [0, 1] (+ the predictor's seeded noise)."""
    lq = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    if family == "resshift":
        return lq, predictor.draw_noise(lq)
    if family == "fasrer":
        return lq, predictor.prior_noise(batch)
    return (lq,)


def reference(predictor, family: str, inputs: tuple) -> torch.Tensor:
    """The PyTorch predictor on the graph's inputs (FASRer draws the same noise itself)."""
    with torch.no_grad():
        sr = predictor(inputs[0]) if family == "fasrer" else predictor(*inputs)
    return sr.float().cpu()


def _window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """spandrel SwinIR's ``window_reverse`` with the batch left to the reshape (the original
    computes it as a Python int, which a trace freezes)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


@contextlib.contextmanager
def traceable():
    """Trace-friendly forms of third-party code (same results), quiet tracer warnings."""
    swinir_arch = sys.modules.get(SWINIR_ARCH)  # loaded by any SwinIR network (slow import)
    original = getattr(swinir_arch, "window_reverse", None)
    if swinir_arch is not None:
        swinir_arch.window_reverse = _window_reverse
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: the check below is the judge
            yield
    finally:
        if swinir_arch is not None:
            swinir_arch.window_reverse = original


def _io_names(family: str) -> tuple[list[str], dict]:
    axes = {"lq": {0: "batch", 2: "height", 3: "width"},
            "sr": {0: "batch", 2: "sr_height", 3: "sr_width"}}  # fmt: skip
    if family == "resshift":
        axes["noise"] = {0: "batch", 2: "latent_height", 3: "latent_width"}
    if family == "fasrer":
        axes["noise"] = {1: "batch"}
    return (["lq", "noise"] if "noise" in axes else ["lq"]), axes


def trace_to_onnx(predictor, family: str, path: Path, opset: int):
    """The fp32 graph of ``predictor`` as an ``onnx.ModelProto`` (traced at check_shapes()[0]):
    the TorchScript exporter, or for FASRer (FFTs) the dynamo exporter."""
    import onnx

    names, axes = _io_names(family)
    graph = graph_of(predictor, family)
    args = check_inputs(predictor, family, *check_shapes(predictor, family)[0], seed=0)
    with traceable(), torch.no_grad():
        if family == "fasrer":
            dynamic = {name: dict.fromkeys(axes[name], torch.export.Dim.DYNAMIC) for name in names}
            program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=["sr"],
                                        dynamic_shapes=dynamic, verbose=False)  # fmt: skip
            program.save(str(path))
            return onnx.load(str(path))
        torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["sr"], dynamic_axes=axes)  # fmt: skip
    return onnx.load(str(path))


def to_fp16(model):
    """The graph in float16, inputs and outputs included (onnxruntime's converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False)


def set_metadata(model, values: dict) -> None:
    """Add ``distsr.<key>`` entries to the file's metadata (kept by any ONNX tool)."""
    import onnx

    new = {f"{META}{key}": str(value) for key, value in values.items()}
    onnx.helper.set_model_props(model, {**metadata(model), **new})


def metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def check_against_torch(predictor, family: str, path: Path, dtype: str, seed: int = 1) -> list:
    """Max abs difference of onnxruntime (CPU) and the PyTorch predictor on each check input;
    raises :class:`OnnxCheckError` when one exceeds ``BOUNDS[dtype]`` or is not finite."""
    from distsr.inference.onnx_predictor import onnx_predictor

    session = onnx_predictor(path, device="cpu")
    diffs, shapes = [], check_shapes(predictor, family)
    for i, shape in enumerate(shapes):
        inputs = check_inputs(predictor, family, *shape, seed=seed + i)
        ref, out = reference(predictor, family, inputs), session.run(*inputs)
        diff = float((out - ref).abs().max()) if out.shape == ref.shape else math.inf
        print(f"onnx check {dtype} lq {list(inputs[0].shape)}: max |onnxruntime - torch| = "
              f"{diff:.3g} (bound {BOUNDS[dtype]:g})")  # fmt: skip
        diffs.append(diff)
    worst = max(diffs)
    if not worst <= BOUNDS[dtype]:  # also catches NaN
        raise OnnxCheckError(
            f"the {dtype} ONNX graph does not reproduce the PyTorch student: max abs difference "
            f"{worst:.3g} > {BOUNDS[dtype]:g} on [0, 1] outputs (inputs "
            f"{[list(s) for s in shapes]} as (batch, h, w)); nothing written"
        )
    return diffs


def export_predictor(predictor, out, family: str, dtype: str = "fp32",
                     opset: int | None = None) -> dict:  # fmt: skip
    """Trace ``predictor`` (of ``family``, on the CPU), convert to ``dtype``, check it against
    the predictor and write ``out`` atomically; returns the file's metadata."""
    import onnx

    if family not in OPSETS:
        raise ValueError(f"ONNX export supports {sorted(OPSETS)} students, not {family!r}")
    if dtype not in DTYPES:
        hint = " (onnxruntime's CPU provider has no bfloat16 Conv)" if dtype == "bf16" else ""
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}{hint}")
    opset = OPSETS[family] if opset is None else int(opset)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"an ONNX export is a .onnx file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        model = trace_to_onnx(predictor, family, tmp, opset)
        onnx.checker.check_model(model)  # the converter's fp16 graph is checked by running it
        if dtype == "fp16":
            model = to_fp16(model)
        set_metadata(model, {"family": family, "scale": predictor.scale, "dtype": dtype,
                             "opset": opset, "multiple": pad_multiple(predictor, family),
                             "latent_factor": getattr(predictor, "factor", 1),
                             "seed": getattr(predictor, "seed", 0)})  # fmt: skip
        onnx.save(model, str(tmp))
        diffs = check_against_torch(predictor, family, tmp, dtype)
        set_metadata(model, {"max_abs_diff": f"{max(diffs):.3g}", "bound": BOUNDS[dtype]})
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return metadata(model)


def export_onnx(checkpoint, out, which: str = "ema", config=None, dtype: str = "fp32",
                opset: int | None = None, seed: int = 0) -> dict:  # fmt: skip
    """The run's student (``load_student``) as a checked ``.onnx`` file; returns its metadata."""
    from distsr.inference.predictors import PREDICTORS, family, load_student

    weights, spec, cfg_path = load_student(checkpoint, which, config=config)
    kind = family(spec, cfg_path)
    if kind not in OPSETS:
        raise ValueError(f"{cfg_path}: ONNX export supports {sorted(OPSETS)} students, "
                         f"not {kind!r}")  # fmt: skip
    cpu = torch.device("cpu")
    predictor = PREDICTORS[kind](weights, spec, cfg_path, "one", cpu, seed, "stochastic")
    return export_predictor(predictor, out, kind, dtype, opset)
