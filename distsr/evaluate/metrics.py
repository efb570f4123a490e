"""Image-quality metrics from pyiqa that never download anything.

Every metric lists the weight files pyiqa would fetch for it, relative to the torch hub folder
(``$TORCH_HOME/hub``, or ``weights_dir``): pyiqa's own files under ``pyiqa/``, torchvision
backbones under ``checkpoints/``, CLIP under ``clip/``; timm backbones are looked up in the
Hugging Face cache. A metric whose files are not all there is skipped with a one-line message
naming the first missing file; it is never created, so nothing is downloaded. As a second guard
the download functions of torch.hub and pyiqa raise while metrics are built, and
``HF_HUB_OFFLINE=1`` is set.

PSNR and SSIM are computed on the Y channel of ITU-R BT.601 YCbCr (MATLAB ``rgb2ycbcr``, as
ResShift, SinSR and the BasicSR family report them), on [0, 1] images, with no border cropped
unless ``crop_border`` is given. pyiqa's own default Y for these is YIQ's; ``color_space`` is
set to ``ycbcr`` here on purpose.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

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


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", True, kwargs=PYIQA_Y, crops=True),
    "ssim": MetricSpec("ssim", True, kwargs=PYIQA_Y, crops=True),
    "lpips": MetricSpec(
        "lpips",
        True,
        lower_better=True,
        files=("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth"),
    ),
    "niqe": MetricSpec("niqe", False, lower_better=True, files=("pyiqa/niqe_modelparameters.mat",)),
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
            return str(hub / rel)
    for repo, names in spec.hf_files:
        if not any(_in_hf_cache(repo, name) for name in names):
            return f"{names[0]} of {repo} in the Hugging Face cache"
    return None


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
