"""The named photo sets of the shard job: ``bundled`` (train / eval, disjoint) and ``debian``
(the Debian packages' photographs, where they are installed; a clear error where not)."""

from __future__ import annotations

import pytest
from PIL import Image

from distsr.data import bundled
from distsr.data.bundled import DEBIAN_INSTALL, bundled_photos, expand_bundled


def test_bundled_training_and_held_out_photos_are_disjoint():
    train, held_out = expand_bundled("bundled"), expand_bundled("bundled:eval")
    assert len(train) == 7 and len(held_out) == 3
    assert not {p.name for p in train} & {p.name for p in held_out}
    assert held_out == bundled_photos("eval")


def test_the_debian_set_is_its_packages_largest_photographs(tmp_path, monkeypatch):
    """Against a stand-in of the packages' folders (the layout they install): every mate photo,
    each listed wallpaper's largest file only, the listed opencv photos, nothing else."""
    mate, plasma, opencv = tmp_path / "mate", tmp_path / "wallpapers", tmp_path / "opencv"
    for folder, name in [(mate, f"{i}.jpg") for i in range(12)] + [
        (opencv, n) for n in (*bundled.OPENCV_PHOTOS, "chessboard.png", "left01.jpg")
    ]:
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / name)
    for name in (*bundled.PLASMA_PHOTOS, "Altai"):  # Altai: an illustration, not listed
        images = plasma / name / "contents" / "images"
        images.mkdir(parents=True)
        for size in ("1920x1080", "2560x1600", "640x480"):
            Image.new("RGB", (8, 8)).save(images / f"{size}.jpg")
    monkeypatch.setattr(bundled, "MATE", mate)
    monkeypatch.setattr(bundled, "PLASMA", plasma)
    monkeypatch.setattr(bundled, "OPENCV", opencv)
    found = expand_bundled("debian")
    wallpapers = [p for p in found if p.is_relative_to(plasma)]
    assert [p.name for p in wallpapers] == ["2560x1600.jpg"] * len(bundled.PLASMA_PHOTOS)
    assert {p.parts[-4] for p in wallpapers} == set(bundled.PLASMA_PHOTOS)
    assert sorted(p.name for p in found if p.is_relative_to(opencv)) == sorted(
        bundled.OPENCV_PHOTOS
    )
    assert len(found) == 12 + len(bundled.PLASMA_PHOTOS) + len(bundled.OPENCV_PHOTOS)
    (mate / "0.jpg").unlink()  # a package half there: the error says how to install them
    with pytest.raises(FileNotFoundError, match=DEBIAN_INSTALL):
        expand_bundled("debian")
