"""Real photographs that ship with installed packages (scikit-image, matplotlib): the default
data of the demo and the tests, so nothing is downloaded. ``inputs=[bundled]`` in the shard job
names the training photos, ``bundled:eval`` the held-out ones.

``inputs=[debian]`` names a larger training set: the photographs (not the illustrations) of three
Debian packages, 1280x1024 to 2560x1600, installed with
``apt-get install mate-backgrounds plasma-workspace-wallpapers opencv-doc``; a wallpaper's largest
file only (the others are the same picture resized). The bundled photos stay held out."""

from __future__ import annotations

from pathlib import Path

TRAIN = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
         "hubble_deep_field.jpg", "ihc.png")  # fmt: skip
EVAL = ("motorcycle_right.png", "retina.jpg", "grace_hopper.jpg")

DEBIAN_INSTALL = "apt-get install mate-backgrounds plasma-workspace-wallpapers opencv-doc"
MATE = Path("/usr/share/backgrounds/mate/nature")
PLASMA = Path("/usr/share/wallpapers")
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                 "FallenLeaf", "Grey", "OneStandsOut", "Path", "summer_1am")  # fmt: skip
OPENCV_PHOTOS = ("aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
                 "box_in_scene.png", "building.jpg", "butterfly.jpg", "fruits.jpg", "graf1.png",
                 "home.jpg", "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
                 "smarties.png", "squirrel_cls.jpg", "stuff.jpg")  # fmt: skip


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


def debian_photos() -> list[Path]:
    """The Debian packages' photographs (module doc); a clear error names what is missing."""
    plasma = [max((PLASMA / name / "contents" / "images").glob("*"), default=None,
                  key=lambda p: _pixels(p.stem)) for name in PLASMA_PHOTOS]  # fmt: skip
    found = sorted(MATE.glob("*.jpg")) + [p for p in plasma if p is not None]
    found += [OPENCV / name for name in OPENCV_PHOTOS if (OPENCV / name).is_file()]
    expected = len(PLASMA_PHOTOS) + len(OPENCV_PHOTOS)
    if len(found) < expected + 12:  # mate-backgrounds: 12 nature photos
        raise FileNotFoundError(
            f"inputs=[debian]: {len(found)} of {expected + 12} photos found under {MATE}, "
            f"{PLASMA}, {OPENCV}; install them with: {DEBIAN_INSTALL}"
        )
    return found


def _pixels(stem: str) -> int:
    """Pixels of a wallpaper file named ``<W>x<H>``."""
    w, _, h = stem.partition("x")
    return int(w) * int(h) if w.isdigit() and h.isdigit() else 0


def expand_bundled(spec: str) -> list[Path] | None:
    """``bundled`` / ``bundled:eval`` / ``debian`` -> photo paths; anything else -> None."""
    if spec == "debian":
        return debian_photos()
    if spec == "bundled":
        return bundled_photos("train")
    if spec.startswith("bundled:"):
        return bundled_photos(spec.split(":", 1)[1])
    return None
