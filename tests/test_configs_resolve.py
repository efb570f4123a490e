"""Every config file in configs/, and every one named by a config or the README, exists and
resolves on a machine without the weights: run configs through ``--dry-run``, job configs
through their job's own loader (absent weight files are listed, not refused)."""

from __future__ import annotations

import re

import pytest

from distsr.config import CONFIG_DIR, load_yaml, planning_without_files
from tests.conftest import ROOT, load_job

# "configs/NAME.yaml" or "python -m distsr.launch NAME"; our config names are lowercase snake case
# (they are launch names), which skips placeholders (CONFIG) and other repositories' files
# (the official code's "configs/TAD-SR.yaml"); a twin is named by its folder ("twins/tadsr_seesr")
NAMED = re.compile(
    r"configs/([a-z0-9_/]+\.ya?ml)\b|distsr\.launch\s+([a-z0-9_]+(?:/[a-z0-9_]+)*)\b"
)

# configs with a required value left blank for the user (their comment says what to pass)
REQUIRED = {"cache_resshift_tiny.yaml": ["teacher.unet_checkpoint=weights/unet.safetensors"]}


def named_configs() -> dict[str, set[str]]:
    """Config file name -> the files that name it."""
    named: dict[str, set[str]] = {}
    for source in [ROOT / "README.md", *sorted(CONFIG_DIR.glob("*.y*ml"))]:
        for match in NAMED.finditer(source.read_text()):
            name = match.group(1) or f"{match.group(2)}.yaml"
            named.setdefault(name, set()).add(source.name)
    return named


def job_loader(name: str):
    """The loader of the job a (non-run) config file belongs to."""
    if name == "demo.yaml":
        from distsr.demo import load_demo_config

        return lambda argv: load_demo_config(argv[1:])  # the demo always reads configs/demo.yaml
    if name.startswith("cache_"):
        return load_job("cache_teacher").load_config
    if name.startswith("shards_"):
        return load_job("make_shards").load_config
    pytest.fail(f"configs/{name}: no job loader known; add its job to job_loader()")


ALL = sorted(set(named_configs()) | {p.name for p in CONFIG_DIR.glob("*.y*ml")})


def test_named_configs_are_found():
    named = named_configs()
    assert {"cache_resshift_realsr_x4.yaml", "cache_resshift_tiny.yaml", "demo.yaml"} <= set(named)
    assert "README.md" in named["resshift_tiny.yaml"]


@pytest.mark.parametrize("name", ALL)
def test_config_exists_and_resolves_without_weights(name, tmp_path, monkeypatch, capsys):
    path = CONFIG_DIR / name
    assert path.is_file(), f"configs/{name} is named in {sorted(named_configs()[name])}"
    monkeypatch.chdir(tmp_path)  # relative weight paths name nothing here
    argv = [str(path), *REQUIRED.get(name, [])]
    if "recipe" in load_yaml(path):
        from distsr.launch import main

        code = main([*argv, "--dry-run"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "# resolved config" in out and '"train_micro_batch_size_per_gpu"' in out
        return
    with planning_without_files() as missing:
        cfg = job_loader(name)(argv)
    assert cfg is not None
    assert all("not found" in msg for _, msg in missing), missing


def test_full_size_cache_config_matches_the_tadsr_teacher(tmp_path, monkeypatch):
    """The cache config caches exactly tadsr_resshift's teacher (else its cache is refused)."""
    monkeypatch.chdir(tmp_path)
    path = CONFIG_DIR / "cache_resshift_realsr_x4.yaml"
    with planning_without_files() as missing:
        cfg = load_job("cache_teacher").load_config([str(path)])
    assert dict(missing) == {
        "teacher.unet_checkpoint": "weights file not found: weights/resshift_realsrx4_s15_v1.pth",
        "teacher.autoencoder.checkpoint": "weights file not found: weights/autoencoder_vq_f4.pth",
    }
    assert cfg.use_gpu and cfg.teacher.scale == 4 and cfg.teacher.schedule.steps == 15
    assert load_yaml(path)["teacher"] == {
        "kind": "resshift",
        **load_yaml(CONFIG_DIR / "tadsr_resshift.yaml")["method"]["teacher"],
    }
