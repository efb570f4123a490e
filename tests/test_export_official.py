"""`python -m distsr.upscale export` of the released-size ResShift UNet (configs/
resshift_realsr_x4.yaml) and of a TAD-SR student of it (configs/tadsr_resshift.yaml): the .pth
holds exactly the official state_dict of the release (tests/fixtures/resshift/
unet_keys_full.txt, copied from the official model: keys, shapes and dtypes, the Swin buffers
included) and passes the official loader's rules. The ~119M-parameter UNet is built on the CPU
for its state_dict (2 s, 0.5 GB) and never run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distsr.config import planning_without_files
from distsr.models.resshift_unet import UNetModelSwin
from distsr.runconfig import load_run_config, to_dict
from distsr.upscale.cli import main as upscale_main

MANIFEST = Path(__file__).parent / "fixtures" / "resshift" / "unet_keys_full.txt"
# the release's shifted Swin blocks, the only ones with an attn_mask buffer
SHIFTED = {f"input_blocks.{i}.1.blocks.1.attn_mask" for i in (1, 4, 7)} | {
    f"output_blocks.{i}.1.blocks.1.attn_mask" for i in (3, 6, 9)
}


def read_manifest() -> tuple[dict, dict[str, tuple[list[int], str]]]:
    """(the official constructor kwargs, key -> (shape, dtype)) of the release's UNet."""
    kwargs, entries = None, {}
    for line in MANIFEST.read_text().splitlines():
        if line.startswith("# constructor kwargs: "):
            kwargs = json.loads(line.split(": ", 1)[1])
        elif line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            entries[key] = (json.loads(shape), dtype)
    return kwargs, entries


def official_reload(entries: dict, ckpt: dict) -> list[str]:
    """The official loader's rules (ResShift ``utils/util_net.reload_model`` after the sampler's
    ``torch.load``), as problems: a ``state_dict`` entry is unwrapped; a ``module.`` or
    ``_orig_mod.`` prefix on the first key is expected on every key; every entry of the model's
    state_dict (parameters and buffers) must be in the file, and is copied in place (here: of
    the same shape and dtype). Extra keys in the file are ignored."""
    if "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    first = next(iter(ckpt))
    prefix = ("_orig_mod." if "_orig_mod" in first else "") + (
        "module." if first.startswith("module.") else ""
    )
    problems = []
    for key, (shape, dtype) in entries.items():
        value = ckpt.get(prefix + key)
        if value is None:
            problems.append(f"missing {prefix + key}")
        elif list(value.shape) != shape or str(value.dtype) != f"torch.{dtype}":
            problems.append(f"{key}: {list(value.shape)} {value.dtype}, want {shape} {dtype}")
    return problems


@pytest.fixture(scope="module")
def manifest():
    kwargs, entries = read_manifest()
    assert len(entries) == 564 and sum(k.endswith("attn_mask") for k in entries) == 6
    return kwargs, entries


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A run of the released-size UNet with weights trained elsewhere (random here): its
    ``export/unet_ema.safetensors`` as the engine writes it, and the UNet it came from."""
    with planning_without_files():  # the VQ-f4 weights are not here; the export only names them
        cfg = load_run_config("resshift_realsr_x4")
    torch.manual_seed(0)
    unet = UNetModelSwin(**cfg.method.unet)
    run = tmp_path_factory.mktemp("released") / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    weights = run / "export" / "unet_ema.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(weights))
    return run, unet.state_dict()


def export(run: Path, out: Path) -> dict:
    assert upscale_main(["export", "--checkpoint", str(run), str(out)]) == 0
    return torch.load(out, map_location="cpu", weights_only=True, mmap=True)


def check_official(ckpt: dict, manifest) -> None:
    kwargs, entries = manifest
    assert set(ckpt) == set(entries)
    assert official_reload(entries, ckpt) == []
    assert {k for k in ckpt if k.endswith("attn_mask")} == SHIFTED
    assert sum(v.numel() for v in ckpt.values()) == 119_355_439  # the manifest's header
    with torch.device("meta"):  # strict load into the architecture, no memory
        UNetModelSwin(**kwargs).load_state_dict(ckpt, strict=True, assign=True)


def test_released_resshift_exports_the_official_state_dict(released, manifest, tmp_path):
    run, state = released
    out = tmp_path / "resshift.pth"
    ckpt = export(run, out)
    check_official(ckpt, manifest)
    # every value as trained, buffers as the model computes them (the masks of shifted blocks)
    assert all(torch.equal(ckpt[k], v) for k, v in state.items())
    assert all(ckpt[k].abs().sum() > 0 for k in SHIFTED)
    official = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert official["model"]["params"] == manifest[0]
    assert official["model"]["target"] == "models.unet.UNetModelSwin"
    assert official["diffusion"]["params"]["steps"] == 15


def test_official_loader_rules_refuse_a_file_missing_a_buffer(released, manifest):
    """The rules above can fail: a checkpoint without one shifted block's mask (as a loader
    that saved parameters only would write) or with a wrong shape is refused."""
    _, entries = manifest
    state = dict(released[1])
    mask = sorted(SHIFTED)[0]
    del state[mask]
    assert official_reload(entries, state) == [f"missing {mask}"]
    wrapped = {"state_dict": {f"module.{k}": v for k, v in released[1].items()}}
    assert official_reload(entries, wrapped) == []
    state = {**released[1], "out.2.bias": torch.zeros(4)}
    assert official_reload(entries, state) == ["out.2.bias: [4] torch.float32, want [3] float32"]


def test_tadsr_student_of_the_release_exports_the_same_way(released, manifest, tmp_path):
    """A TAD-SR run (configs/tadsr_resshift.yaml) exports export/student_ema.safetensors, a copy
    of the teacher's UNet: the same official file."""
    run_dir, state = released
    with planning_without_files():
        cfg = load_run_config("tadsr_resshift")
    run = tmp_path / "tadsr"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.link(run_dir / "export" / "unet_ema.safetensors", run / "export" / "student_ema.safetensors")
    out = tmp_path / "student.pth"
    ckpt = export(run, out)
    check_official(ckpt, manifest)
    assert all(torch.equal(ckpt[k], v) for k, v in state.items())
    official = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert official["model"]["params"] == manifest[0]
    assert official["diffusion"]["params"]["steps"] == cfg.method.teacher.schedule.steps == 15
