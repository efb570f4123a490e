"""Typed configs for the data side: degradation, shard making, and the training reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

KernelType = Literal[
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"
]
_ALL_KERNELS: list[KernelType] = list(get_args(KernelType))


@dataclass
class Stage1Config:
    """One order of Real-ESRGAN's degradation (blur -> resize -> noise -> JPEG).

    Defaults are the first stage of Real-ESRGAN's ``train_realesrgan_x4plus.yml``. The blur
    kernel size is drawn from the odd sizes in ``[min_kernel_size, blur_kernel_size]`` (7..21 in
    Real-ESRGAN, whose ``blur_kernel_size: 21`` is that upper end). ``blur_prob`` is 1 here
    (stage 1 always blurs) and is ``second_blur_prob`` in stage 2.
    """

    blur_prob: float = 1.0
    blur_kernel_size: int = 21
    min_kernel_size: int = 7
    kernel_list: list[KernelType] = field(default_factory=lambda: list(_ALL_KERNELS))
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])  # sigma on 0..255
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[int] = field(default_factory=lambda: [30, 95])

    def validate(self):
        problems = []
        for key in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                problems.append((key, f"probability must be in [0, 1], got {value}"))
        for key in ("blur_kernel_size", "min_kernel_size"):
            value = getattr(self, key)
            if value < 1 or value % 2 == 0:
                problems.append((key, f"kernel size must be odd and >= 1, got {value}"))
        if self.min_kernel_size > self.blur_kernel_size:
            problems.append(("min_kernel_size", "must be <= blur_kernel_size"))
        problems += _check_weights("kernel_prob", self.kernel_prob, len(self.kernel_list))
        problems += _check_weights("resize_prob", self.resize_prob, 3)
        for key in ("blur_sigma", "betag_range", "betap_range", "resize_range"):
            problems += _check_range(key, getattr(self, key), positive=True)
        for key in ("noise_range", "poisson_scale_range", "jpeg_range"):
            problems += _check_range(key, getattr(self, key), positive=False)
        if len(self.resize_range) == 2 and not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            problems.append(("resize_range", "must hold 1: 'down' draws [min, 1], 'up' [1, max]"))
        if self.jpeg_range and max(self.jpeg_range) > 100:
            problems.append(("jpeg_range", f"JPEG quality must be <= 100, got {self.jpeg_range}"))
        return problems


@dataclass
class Stage2Config(Stage1Config):
    """The second order; defaults are the ``*2`` keys of ``train_realesrgan_x4plus.yml``
    (``blur_prob`` = ``second_blur_prob``). Its ``jpeg_range`` is used by the final JPEG."""

    blur_prob: float = 0.8
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 1.5])
    resize_prob: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range: list[float] = field(default_factory=lambda: [0.3, 1.2])
    noise_range: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 2.5])


@dataclass
class DegradationConfig:
    """How ``lq`` is made from a ``gt`` crop (see ``distsr.data.degradation``).

    ``kind="bicubic"``: antialiased bicubic downscale by ``scale``; the stage fields are ignored.
    ``kind="realesrgan"``: the second-order pipeline of Real-ESRGAN (Wang et al., 2021, Sec. 3),
    ``stage1`` then ``stage2``, then resize to gt/scale + sinc filter (``final_sinc_prob``) and
    JPEG in random order. The final sinc kernel size uses ``stage2``'s kernel size range.
    """

    kind: Literal["bicubic", "realesrgan"] = "bicubic"
    scale: int = 4
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    final_sinc_prob: float = 0.8

    def validate(self):
        """Problems of this level only; ``from_dict`` validates ``stage1``/``stage2`` itself,
        ``all_problems()`` collects every level (for configs built in code)."""
        problems = []
        if self.scale < 1:
            problems.append(("scale", f"must be >= 1, got {self.scale}"))
        if not 0.0 <= self.final_sinc_prob <= 1.0:
            problems.append(("final_sinc_prob", f"must be in [0, 1], got {self.final_sinc_prob}"))
        return problems

    def all_problems(self):
        nested = [
            (f"{name}.{key}", msg)
            for name in ("stage1", "stage2")
            for key, msg in getattr(self, name).validate()
        ]
        return self.validate() + nested


def _check_weights(key, weights, n):
    if len(weights) != n:
        return [(key, f"needs {n} entries, got {len(weights)}")]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        return [(key, f"weights must be >= 0 with a positive sum, got {weights}")]
    return []


def _check_range(key, pair, positive):
    if len(pair) != 2:
        return [(key, f"must be [min, max], got {pair}")]
    if pair[0] > pair[1]:
        return [(key, f"min > max in {pair}")]
    if pair[0] < 0 or (positive and pair[0] == 0):
        return [(key, f"min must be {'> 0' if positive else '>= 0'}, got {pair[0]}")]
    return []


@dataclass
class AugmentConfig:
    """Random flips and rotations of each training sample (``distsr.data.augment``): BasicSR's
    ``use_hflip`` (``hflip``) and ``use_rot`` (``rot90``: vertical flip and transpose), applied
    alike to lq, gt and the sample's pixel-space teacher-cache targets. Both on: the 8 dihedral
    transforms, uniformly (MTKD, paper 004 Sec. 4.2). Off by default."""

    hflip: bool = False
    rot90: bool = False

    @property
    def enabled(self) -> bool:
        return self.hflip or self.rot90


@dataclass
class DataConfig:
    """The training reader (``distsr.data.reader``): resampled WebDataset shards, a shuffle
    buffer, an optional paired random crop, optional flips/rotations (``augment``) and
    batching, per rank and DataLoader worker."""

    shards: list[str] = field(default_factory=list)  # dirs, globs or brace patterns of .tar files
    batch_size: int = 4  # micro-batch per rank
    num_workers: int = 0  # torch DataLoader workers per rank (0 = in the training process)
    shuffle: int = 64  # shuffle buffer (samples); 0 = no shuffling
    gt_size: int | None = None  # random-crop gt (and the aligned lq) to this size; None = as stored
    scale: int = 4  # gt size / lq size of the shards
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self):
        problems = []
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        if self.num_workers < 0:
            problems.append(("num_workers", f"must be >= 0, got {self.num_workers}"))
        if self.shuffle < 0:
            problems.append(("shuffle", f"must be >= 0, got {self.shuffle}"))
        if self.scale < 1:
            problems.append(("scale", f"must be >= 1, got {self.scale}"))
        elif self.gt_size is not None and (self.gt_size < self.scale or self.gt_size % self.scale):
            problems.append(("gt_size", f"must be a positive multiple of scale={self.scale}"))
        return problems


IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]


@dataclass
class ShardsConfig:
    """The shard-making job (``jobs/make_shards.py``): image folders -> ``gt`` crops ->
    ``degradation`` -> ``{prefix}-NNNNNN.tar`` shards of ``shard_size`` samples in ``output``.

    ``crop_mode="grid"`` cuts every ``stride``-spaced crop (``None`` = ``crop_size``, no
    overlap; the last row/column is aligned to the border); ``"random"`` cuts ``random_crops``
    crops per image at seeded positions. Images smaller than ``max(min_size, crop_size)`` on
    either side are skipped. ``workers`` processes write shards in parallel (1 = in-process).
    """

    inputs: list[str] = field(default_factory=list)  # image folders (recursive), globs or files
    output: str = ""
    prefix: str = "train"
    crop_size: int = 256
    crop_mode: Literal["grid", "random"] = "grid"
    stride: int | None = None
    random_crops: int = 8
    min_size: int = 0
    shard_size: int = 1000
    shuffle: bool = True  # spread each image's crops over all shards (seeded); false = image order
    seed: int = 0
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    extensions: list[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    workers: int = 1

    def validate(self):
        problems = []
        if not self.inputs:
            problems.append(("inputs", "needs at least one image folder, glob or file"))
        if not self.output:
            problems.append(("output", "needs the folder to write shards into"))
        if not self.prefix or any(c in self.prefix for c in "/\\.{}*?[]"):
            problems.append(("prefix", f"must be a plain file-name prefix, got {self.prefix!r}"))
        scale = self.degradation.scale
        if self.crop_size < 1 or (scale >= 1 and self.crop_size % scale):
            problems.append(
                ("crop_size", f"must be a positive multiple of degradation.scale={scale}")
            )
        if self.stride is not None and self.stride < 1:
            problems.append(("stride", f"must be >= 1 (or null for crop_size), got {self.stride}"))
        for key in ("random_crops", "shard_size", "workers"):
            if getattr(self, key) < 1:
                problems.append((key, f"must be >= 1, got {getattr(self, key)}"))
        if self.min_size < 0:
            problems.append(("min_size", f"must be >= 0, got {self.min_size}"))
        if self.seed < 0:
            problems.append(("seed", f"must be >= 0, got {self.seed}"))
        bad_ext = [e for e in self.extensions if not e.startswith(".")]
        if not self.extensions or bad_ext:
            problems.append(("extensions", f"need a list like ['.png', '.jpg'], got {bad_ext}"))
        return problems
