"""cluster/Dockerfile agrees with the pinned versions and the image the manifests run."""

from __future__ import annotations

import re

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def base_image() -> tuple[str, str]:
    """(image, tag) of the Dockerfile's single FROM line."""
    lines = [ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.strip()]
    froms = [ln.split()[1] for ln in lines if ln.split()[0].upper() == "FROM"]
    assert len(froms) == 1, froms
    image, _, tag = froms[0].partition(":")
    return image, tag


def pins() -> tuple[SpecifierSet, SpecifierSet]:
    """(the ray requirement's specifier, requires-python) from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rays = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    assert len(rays) == 1
    return rays[0].specifier, SpecifierSet(project["requires-python"])


def test_dockerfile_base_matches_pinned_ray_and_python():
    image, tag = base_image()
    assert image == "rayproject/ray"
    found = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", tag)
    assert found, f"base tag {tag!r} is not <ray version>-py<XY>-gpu|cuXXX"
    ray_version, major, minor, _ = found.groups()
    ray_pin, python_pin = pins()
    assert ray_version in ray_pin, f"image Ray {ray_version} is outside the pin ray{ray_pin}"
    # requires-python must admit the image's Python
    assert Version(f"{major}.{minor}.0") in python_pin, (tag, python_pin)


def test_manifests_run_the_image_the_dockerfile_builds():
    _, tag = base_image()
    ray_version = tag.split("-")[0]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    built = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile)
    assert built, "the Dockerfile's header names its build command"
    image = built.group(1)
    assert image == f"distsr:{tag}"  # the distsr tag mirrors its base
    assert f"-t {image}" in (CLUSTER / "README.md").read_text()
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert job["rayVersion"] == ray_version
    groups = [job["headGroupSpec"], *job["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images and all(i.endswith(f"/{image}") or i == image for i in images), images
    assert image in (CLUSTER / "ray-cluster.yaml").read_text()


def test_dockerfile_installs_the_readme_way():
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^ +(pip install -e \"\.\[[a-z,]+\]\")$", readme, re.M)
    assert install, "README's install command"
    assert install.group(1) in (CLUSTER / "Dockerfile").read_text()
