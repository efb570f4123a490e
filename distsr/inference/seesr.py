"""SeeSR predictors: ``fn(lq [B,3,h,w] in [0,1]) -> sr [B,3,h*scale,w*scale] in [0,1]``.

* :class:`SeeSROneStep`: a TAD-SR student of SeeSR: one UNet + ControlNet call at t = 999 from
  the LR latent noised at t = 999 (``SeeSRTeacher.student_step``), decoded, AdaIN colour fix.
* :class:`SeeSRMultiStep`: the frozen SeeSR teacher's 50-step DDPM sampler with classifier-free
  guidance (the teacher column of a report).

The condition is computed by the frozen parts at inference, as in training's cache job
(``SeeSRTeacher.prepare``): RAM tags + image embeddings of the whole lq, the prompt's CLIP
embedding, the bicubic-upscaled lq (ControlNet condition) and its VAE latent.

Large inputs are tiled in latent space as the official SeeSR pipeline does: when the latent is
larger than ``tile`` latents, every eps evaluation runs UNet + ControlNet on overlapping
``tile`` x ``tile`` latent tiles (with the matching crop of the ControlNet condition and the
whole image's text and RAM embeddings) and blends them with a Gaussian weight map (variance 0.01
of the tile size, official ``_gaussian_weights``). The VAE encoder and decoder run on the whole
image (no tiled VAE), so memory bounds the image size (the SD-2 VAE decoder's activations grow
with the output area; its last blocks run at full output resolution). The output is resized
(bicubic) to exactly lq x scale when the up-scaling rule made it differ (short side below
process_size / scale, or not a multiple of 8).

The noise (z_T's eps, and the sampler's per-step noise) comes from a fresh CPU generator seeded
with ``seed`` on every call, for the whole latent: tiles share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distsr.inference.tiling import tile_spans
from distsr.teachers.seesr import SeeSRTeacher, adain_color_fix

LATENT_FACTOR = 8  # SD-2 VAE
TILE = 96  # latents (official test_seesr.py latent_tiled_size)
OVERLAP = 4  # latents (official latent_tiled_overlap)
GAUSSIAN_VAR = 0.01  # official _gaussian_weights


def gaussian_weights(h: int, w: int, var: float = GAUSSIAN_VAR) -> torch.Tensor:
    """[h, w] weights exp(-(x - mid)^2 / (2 var n^2)) per axis, outer product (n = the length
    of the axis, mid its centre), so a tile's centre outweighs its borders."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * var))

    return axis(h)[:, None] * axis(w)[None, :]


class TiledDenoiser:
    """``(z_t, t, cond) -> eps`` of ``net`` over overlapping latent tiles, Gaussian-blended;
    the whole latent in one call when it fits one tile (then bit-equal to ``net``)."""

    def __init__(self, net, tile: int = TILE, overlap: int = OVERLAP):
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"need latent tile >= 1 and 0 <= overlap < tile, got {tile}/{overlap}")
        self.net, self.tile, self.overlap = net, int(tile), int(overlap)

    def tiles(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        rows, cols = tile_spans(h, self.tile, self.overlap), tile_spans(w, self.tile, self.overlap)
        return [(top, bottom, left, right) for top, bottom in rows for left, right in cols]

    def __call__(self, z_t: torch.Tensor, t, cond: dict) -> torch.Tensor:
        h, w = z_t.shape[-2:]
        tiles = self.tiles(h, w)
        if len(tiles) == 1:
            return self.net(z_t, t, cond)
        f = LATENT_FACTOR
        eps = torch.zeros(z_t.shape, dtype=torch.float64, device=z_t.device)
        weight = torch.zeros((h, w), dtype=torch.float64, device=z_t.device)
        for top, bottom, left, right in tiles:
            lq_up = cond["lq_up"][..., top * f : bottom * f, left * f : right * f]
            part = self.net(z_t[..., top:bottom, left:right], t, {**cond, "lq_up": lq_up})
            g = gaussian_weights(bottom - top, right - left).to(z_t.device)
            eps[..., top:bottom, left:right] += part.double() * g
            weight[top:bottom, left:right] += g
        return (eps / weight).float()


class SeeSROneStep:
    """One-step SeeSR student: x0 = (z_T - sqrt(1 - abar) eps) / sqrt(abar) at t = 999 from
    z_T = sqrt(abar_999) z_lq + sqrt(1 - abar_999) eps, decoded, colour-fixed to lq_up.
    ``teacher``: a SeeSRTeacher whose denoiser is the student (``build_seesr_teacher(...,
    denoiser=load_seesr_denoiser(...))``)."""

    steps = 1

    def __init__(self, teacher: SeeSRTeacher, seed: int = 0, tile: int = TILE,
                 overlap: int = OVERLAP):  # fmt: skip
        self.teacher = teacher.eval().requires_grad_(False)
        self.scale, self.seed = teacher.cfg.scale, int(seed)
        self.net = TiledDenoiser(teacher.denoiser, tile, overlap)

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    @property
    def num_params(self) -> int:
        """UNet + ControlNet + VAE + text encoder + RAM: what one inference call runs."""
        return sum(p.numel() for p in self.teacher.parameters())

    def with_tiling(self, tile: int, overlap: int):
        """The same predictor with latent tiles of ``tile`` / ``overlap`` latents."""
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.net = TiledDenoiser(self.net.net, tile, overlap)
        return twin

    def tiled(self, lq: torch.Tensor, tile: int, overlap: int, progress=None) -> torch.Tensor:
        """sr with latent tiles of ``tile`` / ``overlap`` lq pixels (x scale / 8 latents): what
        ``inference.tiling.upscale_tiled`` calls for this predictor."""
        to_latent = self.scale / LATENT_FACTOR
        fn = self.with_tiling(max(1, round(tile * to_latent)), round(overlap * to_latent))
        if progress is not None:
            progress.reset(total=1)
        sr = fn(lq).cpu()
        if progress is not None:
            progress.update(1)
        return sr

    def draw(self, count: int, cond: dict) -> torch.Tensor:
        """``count`` noise tensors [count, B, 4, h, w] from a fresh generator seeded ``seed``."""
        shape = (count, cond["z_lq"].shape[0], *self.teacher.noise_shape(cond))
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed))

    def prepare(self, lq: torch.Tensor) -> dict:
        if lq.ndim != 4 or lq.shape[1] != 3:
            raise ValueError(f"lq must be [B, 3, h, w], got {tuple(lq.shape)}")
        return self.teacher.prepare(lq)

    def finish(self, z0: torch.Tensor, cond: dict, hw: tuple[int, int]) -> torch.Tensor:
        """Decode, AdaIN colour fix to lq_up, resize to lq x scale if the rule changed it."""
        sr = adain_color_fix(self.teacher.decode(z0), cond["lq_up"])
        size = (hw[0] * self.scale, hw[1] * self.scale)
        if tuple(sr.shape[-2:]) != size:
            sr = F.interpolate(sr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return sr

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        cond = self.prepare(lq)
        teacher = self.teacher
        z_T = teacher.prior(cond, self.draw(1, cond)[0].to(self.device))
        return self.finish(teacher.student_step(self.net, z_T, cond), cond, lq.shape[-2:])


class SeeSRMultiStep(SeeSROneStep):
    """The frozen SeeSR teacher's sampler (DDPM ``steps`` with CFG), latent-tiled like the
    one-step student; ``teacher`` holds the release's UNet + ControlNet."""

    def __init__(self, teacher: SeeSRTeacher, seed: int = 0, tile: int = TILE,
                 overlap: int = OVERLAP):  # fmt: skip
        super().__init__(teacher, seed, tile, overlap)
        self.steps = len(teacher.timesteps)

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor) -> torch.Tensor:
        cond = self.prepare(lq)
        noise = self.draw(self.teacher.noise_tensors, cond).to(self.device)
        return self.finish(self.teacher.sample(cond, noise, denoiser=self.net), cond,
                           lq.shape[-2:])  # fmt: skip
