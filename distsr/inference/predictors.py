"""Super-resolution predictors: ``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*scale,w*scale] in [0,1]``.

* :class:`Bicubic`: the baseline every table carries.
* :class:`ResShiftOneStep`: a one-step student of ResShift (Yue et al., NeurIPS 2023): one UNet
  call at the last step from the prior, z_{T-1} = z_y + kappa sqrt(eta_{T-1}) eps, then decode.
* :class:`ResShiftMultiStep`: the full T-step sampler (the teacher column of a report).
* :func:`load_predictor`: the predictor of a run folder (``config.yaml`` + ``export/``), by
  the family of the run's student spec: these ResShift ones or the SeeSR ones of
  ``inference.seesr``.

The lq -> (z_y, UNet condition) path is ``models.resshift.ResShift.prepare``, the rule training
used; as in the official ``ResShiftSampler``, lq is reflect-padded on the bottom/right to a
multiple the UNet's windows need and the result is cropped back, clamped and mapped to [0, 1].

The latent noise is drawn for the *unpadded* image from a fresh generator seeded with ``seed``
on every call (a result depends on the image, its place in the batch and the seed) and is
reflect-padded like lq. A caller may pass ``noise=`` instead: tiled upscaling hands every tile
its crop of one full-image noise map (:meth:`ResShiftOneStep.draw_noise`), so tiles agree
where they overlap.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from distsr.models.autoencoder import PixelAutoencoder
from distsr.models.checkpoint import load_official_state_dict
from distsr.models.resshift import ResShift, ResShiftSpec
from distsr.models.resshift_unet import UNetModelSwin
from distsr.models.swin import SwinTransformerBlock
from distsr.seeding import seeded_noise


class Bicubic:
    """Bicubic upscaling (``F.interpolate``, align_corners=False), clamped to [0, 1]."""

    steps = 0
    num_params = 0

    def __init__(self, scale: int):
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.scale = int(scale)

    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        sr = F.interpolate(lq.float(), scale_factor=self.scale, mode="bicubic", align_corners=False)
        return sr.clamp(0, 1)


def latent_factor(autoencoder: torch.nn.Module) -> int:
    """Spatial downsampling of the first stage: 1 for the pixel autoencoder, 4 for VQ-f4."""
    return 1 if isinstance(autoencoder, PixelAutoencoder) else 4


def window_multiple(unet: UNetModelSwin) -> int:
    """Latent size multiple the UNet needs: every Swin window at the deepest level (README §2,
    official padding_offset = lq_size = 64 = window 8 x 2^3 for the released x4 model)."""
    windows = [m.window_size for m in unet.modules() if isinstance(m, SwinTransformerBlock)]
    return math.lcm(*windows, 1) * 2 ** (len(unet.num_res_blocks) - 1)


def pad_bottom_right(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Reflect padding as the official sampler (replicate when the image is too small)."""
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class ResShiftOneStep:
    """One-step ResShift student: x0 = f(normalize_input(z_{T-1}), T-1, lq), decoded
    (``models.resshift.ResShift.one_step``)."""

    steps = 1

    def __init__(self, model: ResShift, seed: int = 0):
        self.model = model.eval().requires_grad_(False)
        self.unet, self.diffusion = model.unet, model.diffusion
        self.scale, self.seed = model.scale, int(seed)
        self.factor = latent_factor(model.autoencoder)
        lat = window_multiple(self.unet)  # lq multiple m: m * scale / factor divisible by lat
        self.multiple = lat * self.factor // math.gcd(lat * self.factor, self.scale)
        self.latent_channels = self.unet.out[-1].out_channels

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        if (h * self.scale) % self.factor or (w * self.scale) % self.factor:
            step = self.factor // math.gcd(self.factor, self.scale)
            raise ValueError(
                f"lq {h}x{w} x{self.scale} is not divisible by the autoencoder's factor "
                f"{self.factor}; crop lq to a multiple of {step}"
            )
        return h * self.scale // self.factor, w * self.scale // self.factor

    def draw_noise(self, lq: torch.Tensor) -> torch.Tensor:
        """Latent eps for the unpadded ``lq`` from a fresh CPU generator seeded with ``seed``."""
        shape = (lq.shape[0], self.latent_channels, *self.latent_size(*lq.shape[-2:]))
        return seeded_noise(shape, self.seed)

    @torch.no_grad()
    def prepare(self, lq: torch.Tensor, noise: torch.Tensor | None):
        """(cond = {"z_y", "lq"}, padded noise, (h, w)): lq padded as the official sampler,
        then ``ResShift.prepare`` (the rule training used)."""
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        h, w = lq.shape[-2:]
        noise = self.draw_noise(lq) if noise is None else noise
        expected = (lq.shape[0], self.latent_channels, *self.latent_size(h, w))
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {expected}")
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        cond = self.model.prepare(pad_bottom_right(lq.to(self.device, torch.float32), ph, pw))
        noise = pad_bottom_right(noise.to(self.device, torch.float32), *self.latent_size(ph, pw))
        return cond, noise, (h, w)

    def finish(self, z0: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        sr = self.model.decode(z0)
        return sr[..., : hw[0] * self.scale, : hw[1] * self.scale]

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        cond, noise, hw = self.prepare(lq, noise)
        z_T = self.diffusion.prior_sample(cond["z_y"], noise)
        return self.finish(self.model.one_step(self.unet, z_T, cond), hw)


class ResShiftMultiStep(ResShiftOneStep):
    """The full ResShift chain over all T steps: ``"stochastic"`` (the official sampler) or
    ``"deterministic"`` (SinSR's ODE-like chain). Prior noise as :class:`ResShiftOneStep`; the
    per-step noise of the stochastic sampler comes from a generator seeded with ``seed + 1``."""

    def __init__(self, model: ResShift, seed: int = 0, sampler: str = "stochastic"):
        super().__init__(model, seed)
        if sampler not in ("stochastic", "deterministic"):
            raise ValueError(f"sampler must be 'stochastic' or 'deterministic', got {sampler!r}")
        self.sampler = sampler
        self.steps = self.diffusion.num_timesteps

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        cond, noise, hw = self.prepare(lq, noise)
        fn, z_y = self.model.denoise_fn(self.unet, cond), cond["z_y"]
        if self.sampler == "deterministic":
            z0 = self.diffusion.sample_deterministic(fn, z_y, noise_prior=noise)
        else:
            steps = self._step_noises(z_y)
            z0 = self.diffusion.sample_stochastic(fn, z_y, noise_prior=noise, step_noises=steps)
        return self.finish(z0, hw)

    def _step_noises(self, z_y: torch.Tensor) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        draws = [torch.randn(z_y.shape, generator=generator) for _ in range(self.steps)]
        return [d.to(z_y.device) for d in draws]


# ---------------------------------------------------------------- loading from a run folder


STUDENT_ENGINES = ("student", "unet")  # distillation recipes, then ResShift teacher training


def _exported(run_dir: Path, which: str, engine: str | None) -> Path:
    """export/<engine>[_ema].safetensors of a run; ``engine=None`` takes the first of
    STUDENT_ENGINES that was exported."""
    engines = [engine] if engine else list(STUDENT_ENGINES)
    names = [f"{e}_ema" if which == "ema" else e for e in engines]
    files = [run_dir / "export" / f"{name}.safetensors" for name in names]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        hint = " (was the run trained with engine.ema_decay? try --raw)" if which == "ema" else ""
        raise FileNotFoundError(
            f"no exported weights in the run folder: {' or '.join(map(str, files))}{hint}"
        )
    return found


def _locate(path: Path, which: str, config, engine: str | None) -> tuple[Path, Path]:
    """(weights file, config.yaml) of a run folder or of a weights file (+ ``config``)."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    if path.is_dir():
        run_dir, weights = path, _exported(path, which, engine)
    elif path.is_file():
        weights = path
        run_dir = path.parent.parent if path.parent.name == "export" else path.parent
    else:
        raise FileNotFoundError(f"checkpoint not found: {path} (a run folder or a weights file)")
    cfg_path = Path(config) if config is not None else run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"run config not found: {cfg_path} (pass --config with the run's config.yaml)"
        )
    return weights, cfg_path


def student_spec(cfg, source):
    """The spec of the network a run exports (its recipe's ``student_spec``): a ResShiftSpec or
    a SeeSRTeacherConfig (``family`` tells which)."""
    from distsr.registry import get_recipe

    spec = get_recipe(cfg.recipe).student_spec(cfg.method)
    family(spec, source)
    return spec


def family(spec, source) -> str:
    """The network family of a student spec, by its type: ``"resshift"``, ``"seesr"``, ``"sr"``
    (a single-pass SR network of DTKD / MTKD) or ``"fasrer"`` (FKdiff, ``inference.fkdiff``).
    The one place inference and export dispatch on (each keeps a table keyed by these names)."""
    from distsr.models.sr.build import StudentConfig
    from distsr.recipes.fkdiff import FASRerStudent
    from distsr.teachers.seesr_config import SeeSRTeacherConfig

    kinds = ((ResShiftSpec, "resshift"), (SeeSRTeacherConfig, "seesr"), (StudentConfig, "sr"),
             (FASRerStudent, "fasrer"))  # fmt: skip
    for cls, name in kinds:
        if isinstance(spec, cls):
            return name
    raise ValueError(f"{source}: the run exports a {type(spec).__name__}; inference and export "
                     "support ResShift, SeeSR, single-pass SR and FASRer students")  # fmt: skip


def load_student(
    run_dir_or_weights: str | Path,
    which: str = "ema",
    *,
    config: str | Path | None = None,
    engine: str | None = None,
):
    """(weights file, the run's student spec, config path) of a run folder (``config.yaml`` +
    ``export/<engine>[_ema].safetensors``; engine default: the student, else ``unet``) or of a
    weights file (official ``.pth`` or exported ``.safetensors``) plus ``config``."""
    from distsr.config import planning_without_files
    from distsr.runconfig import load_run_config

    weights, cfg_path = _locate(Path(run_dir_or_weights).expanduser(), which, config, engine)
    with planning_without_files():  # the training's cache and teacher files may be gone
        cfg = load_run_config(str(cfg_path))
    return weights, student_spec(cfg, cfg_path), cfg_path


def load_unet(
    run_dir_or_weights: str | Path,
    which: str = "ema",
    *,
    config: str | Path | None = None,
    engine: str | None = None,
):
    """(ResShift UNet strictly loaded on the CPU, its ResShift config section, config path); see
    :func:`load_student`. ``unet_checkpoint`` of the config is not read."""
    weights, section, cfg_path = load_student(run_dir_or_weights, which, config=config,
                                              engine=engine)  # fmt: skip
    if family(section, cfg_path) != "resshift":
        raise ValueError(f"{cfg_path}: the run's student is not a ResShift UNet")
    return resshift_unet(weights, section, cfg_path), section, cfg_path


def resshift_unet(weights, spec: ResShiftSpec, cfg_path) -> UNetModelSwin:
    unet = UNetModelSwin(**spec.unet)
    load_official_state_dict(weights, unet, model_name=f"the UNet of {cfg_path}")
    return unet.eval()


def _resshift_predictor(weights, spec, cfg_path, steps, device, seed, sampler):
    model = ResShift(spec, unet=resshift_unet(weights, spec, cfg_path)).to(device)
    if steps == "one":
        return ResShiftOneStep(model, seed)
    return ResShiftMultiStep(model, seed, sampler)


def _seesr_predictor(weights, spec, cfg_path, steps, device, seed, sampler):
    """The one-step student (its exported UNet + ControlNet), or with ``steps="all"`` the
    frozen teacher of the run (the release's weights; the export is not read)."""
    from distsr.inference.seesr import SeeSRMultiStep, SeeSROneStep
    from distsr.teachers.seesr import build_seesr_teacher, load_seesr_denoiser

    if steps == "all":
        return SeeSRMultiStep(build_seesr_teacher(spec, device), seed)
    student = load_seesr_denoiser(spec, weights)
    return SeeSROneStep(build_seesr_teacher(spec, device, denoiser=student), seed)


def _sr_predictor(weights, spec, cfg_path, steps, device, seed, sampler):
    from distsr.inference.sr_predictor import sr_predictor

    return sr_predictor(weights, spec, cfg_path, device=device)


def _fasrer_predictor(weights, spec, cfg_path, steps, device, seed, sampler):
    from distsr.inference.fkdiff import fasrer_predictor

    return fasrer_predictor(weights, spec, cfg_path, device=device, seed=seed)


PREDICTORS = {"resshift": _resshift_predictor, "seesr": _seesr_predictor, "sr": _sr_predictor,
              "fasrer": _fasrer_predictor}  # fmt: skip


def load_predictor(
    run_dir_or_weights: str | Path,
    which: str = "ema",
    steps: str = "one",
    *,
    config: str | Path | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    sampler: str = "stochastic",
    engine: str | None = None,
):
    """The predictor of a run's student (see :func:`load_student` for where the weights come
    from), by the family of its spec: ResShift (:class:`ResShiftOneStep` /
    :class:`ResShiftMultiStep`) or SeeSR (``inference.seesr``).

    ``steps="one"`` gives the one-step student, ``"all"`` the full sampler (ResShift: the T-step
    chain of the run's UNet, ``sampler`` "stochastic" or "deterministic"; SeeSR: the frozen
    teacher's DDPM + CFG sampler). ``which``: "ema" or "raw" weights. An ``.onnx`` file (from
    ``upscale export --format onnx``) gives ``inference.onnx_predictor``'s onnxruntime one.
    """
    if steps not in ("one", "all"):
        raise ValueError(f"steps must be 'one' or 'all', got {steps!r}")
    if Path(run_dir_or_weights).suffix == ".onnx":  # an exported graph: onnxruntime
        from distsr.inference.onnx_predictor import onnx_predictor

        if steps != "one":
            raise ValueError("an .onnx file holds the one-step student only (steps='one')")
        return onnx_predictor(run_dir_or_weights, device, seed)
    weights, spec, cfg_path = load_student(run_dir_or_weights, which, config=config,
                                           engine=engine)  # fmt: skip
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    build = PREDICTORS[family(spec, cfg_path)]
    return build(weights, spec, cfg_path, steps, device, seed, sampler)
