"""A student exported to ONNX (``upscale.onnx_export``) as a predictor run by onnxruntime:
``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*scale,w*scale] in [0,1]``, as ``inference.predictors``.

The file's metadata (``distsr.scale``, ``distsr.dtype``, ...) says how to feed it. A FASRer
graph gets the seeded prior noise of ``inference.fkdiff.FASRerPredictor`` and runs whole images
(its output is the PyTorch student's untiled one).
A graph with a ``noise`` input (a one-step ResShift student) gets the seeded prior noise of
:meth:`ResShiftOneStep.draw_noise <distsr.inference.predictors.ResShiftOneStep.draw_noise>`,
so ``upscale_tiled`` hands each tile its crop of one full-image noise map, exactly as for the
PyTorch student; the same seed gives the same image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distsr.seeding import seeded_noise

META = "distsr."


def _providers(device) -> list[str]:
    import onnxruntime as ort

    wanted = torch.device(device) if device is not None else None
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if wanted is not None and wanted.type == "cuda" and not cuda:
        raise ValueError("this onnxruntime has no CUDA provider; use --device cpu")
    use_cuda = cuda and (wanted is None or wanted.type == "cuda")
    return (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]


def read_metadata(path: Path) -> tuple[dict[str, str], list[str]]:
    """(the ``distsr.*`` metadata of an exported file without the prefix, its input names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key[len(META) :]: p.value for p in model.metadata_props if p.key.startswith(META)}
    if "scale" not in props:
        raise ValueError(f"{path} has no distsr metadata (distsr.scale); export it with "
                         "`python -m distsr.upscale export --format onnx`")  # fmt: skip
    return props, [i.name for i in model.graph.input]


class OnnxPredictor:
    """A single-pass ONNX student (``lq -> sr``) run by onnxruntime."""

    steps = 1

    def __init__(self, path: str | Path, device=None, meta: dict | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = meta if meta is not None else read_metadata(self.path)[0]
        self.scale = int(self.meta["scale"])
        self.dtype = np.float16 if self.meta.get("dtype") == "fp16" else np.float32
        self.session = ort.InferenceSession(str(self.path), providers=_providers(device))

    @property
    def num_params(self) -> int:
        import onnx

        model = onnx.load(str(self.path))
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The graph on its inputs, in its order (lq[, noise]); sr as float32 on the CPU."""
        names = [i.name for i in self.session.get_inputs()]
        feeds = {k: v.detach().cpu().numpy().astype(self.dtype) for k, v in zip(names, inputs)}
        (sr,) = self.session.run(["sr"], feeds)
        return torch.from_numpy(sr.astype(np.float32))

    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        return self.run(lq)


class OnnxResShiftOneStep(OnnxPredictor):
    """A one-step ResShift student's graph (``lq, noise -> sr``); the noise is drawn as the
    PyTorch predictor draws it, from ``seed``."""

    def __init__(self, path: str | Path, device=None, seed: int = 0, meta: dict | None = None):
        super().__init__(path, device, meta)
        self.seed, self.factor = int(seed), int(self.meta.get("latent_factor", 1))
        noise = next(i for i in self.session.get_inputs() if i.name == "noise")
        self.latent_channels = int(noise.shape[1])

    def draw_noise(self, lq: torch.Tensor) -> torch.Tensor:
        h, w = lq.shape[-2:]
        if (h * self.scale) % self.factor or (w * self.scale) % self.factor:
            raise ValueError(f"lq {h}x{w} x{self.scale} is not divisible by the latent factor "
                             f"{self.factor}")  # fmt: skip
        size = (h * self.scale // self.factor, w * self.scale // self.factor)
        return seeded_noise((lq.shape[0], self.latent_channels, *size), self.seed)

    def __call__(self, lq: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        multiple = int(self.meta.get("multiple", 1))
        h, w = lq.shape[-2:]
        if (-h) % multiple >= h or (-w) % multiple >= w:
            raise ValueError(f"lq {h}x{w} is too small for this graph's reflect pad to a multiple "
                             f"of {multiple}; the PyTorch student takes it")  # fmt: skip
        return self.run(lq, self.draw_noise(lq) if noise is None else noise)


class OnnxFASRer(OnnxPredictor):
    """A FASRer student's graph (``lq, noise [T + 1, B, 4 C'] -> sr``, the prior diffusion
    inside), the prior noise drawn as ``inference.fkdiff.FASRerPredictor`` draws it, from
    ``seed``. Images run whole: the graph computes Z_hat from the lq it is given, so tiles could
    not share the whole image's Z_hat as the PyTorch student's tiles do."""

    def __init__(self, path: str | Path, device=None, seed: int = 0, meta: dict | None = None):
        super().__init__(path, device, meta)
        noise = next(i for i in self.session.get_inputs() if i.name == "noise")
        self.seed, self.dim = int(seed), int(noise.shape[2])
        self.timesteps = int(noise.shape[0]) - 1

    def prior_noise(self, batch: int) -> torch.Tensor:
        from types import SimpleNamespace

        from distsr.inference.fkdiff import FASRerPredictor

        # the PyTorch student's rule, on the schedule's two numbers the graph's noise input has
        schedule = SimpleNamespace(dim=self.dim, timesteps=self.timesteps)
        like = SimpleNamespace(seed=self.seed, schedule=schedule)
        return FASRerPredictor.prior_noise(like, batch)

    def tiled(self, lq: torch.Tensor, tile: int, overlap: int, progress=None) -> torch.Tensor:
        """``upscale_tiled``'s hook: the whole image in one call."""
        return self(lq)

    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        return self.run(lq, self.prior_noise(lq.shape[0]))


def onnx_predictor(path: str | Path, device=None, seed: int = 0) -> OnnxPredictor:
    """The predictor of an exported ``.onnx`` file (a noise input makes it a ResShift one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    meta, inputs = read_metadata(path)
    if meta.get("family") == "fasrer":
        return OnnxFASRer(path, device, seed, meta)
    if "noise" in inputs:
        return OnnxResShiftOneStep(path, device, seed, meta)
    return OnnxPredictor(path, device, meta)
