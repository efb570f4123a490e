"""Real photographs that ship with installed packages (scikit-image, matplotlib): the default
data of the demo and the tests, so nothing is downloaded. ``inputs=[bundled]`` in the shard job
names the training photos, ``bundled:eval`` the held-out ones."""

from __future__ import annotations

from pathlib import Path

TRAIN = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
         "hubble_deep_field.jpg", "ihc.png")  # fmt: skip
EVAL = ("motorcycle_right.png", "retina.jpg", "grace_hopper.jpg")


def _locations() -> list[Path]:
    import matplotlib
    import skimage

    return [
        Path(skimage.__file__).parent / "data",
        Path(matplotlib.get_data_path()) / "sample_data",
    ]


def bundled_photos(split: str = "train") -> list[Path]:
    """Paths of the bundled photos of ``split`` ("train" or "eval")."""
    names = {"train": TRAIN, "eval": EVAL}.get(split)
    if names is None:
        raise ValueError(f"unknown bundled split {split!r}; valid: train, eval")
    found = []
    for name in names:
        hits = [loc / name for loc in _locations() if (loc / name).is_file()]
        if not hits:
            raise FileNotFoundError(f"bundled photo {name} not found in {_locations()}")
        found.append(hits[0])
    return found


def expand_bundled(spec: str) -> list[Path] | None:
    """``bundled`` / ``bundled:eval`` -> photo paths; anything else -> None."""
    if spec == "bundled":
        return bundled_photos("train")
    if spec.startswith("bundled:"):
        return bundled_photos(spec.split(":", 1)[1])
    return None
