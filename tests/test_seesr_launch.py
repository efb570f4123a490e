"""``python -m distsr.launch tadsr_seesr``: the full-size plan without weights or GPUs, and the tiny
variant end to end in process (tiny parts written as files -> the cache job from
configs/cache_seesr_tiny.yaml -> TAD-SR training from the cache only, with a checkpoint
written). The users' command, ``ray job submit --working-dir . -- python -m distsr.launch
tadsr_seesr_tiny ...`` on a ``ray start --head`` cluster with token authentication, runs as the
README writes it in tests/test_readme.py, which checks there that the cache job ran the teacher's
parts (``LIVE``, ``SAMPLER``) and the workers only read the cache (``STORED``)."""

from __future__ import annotations

import pytest
import torch

from distsr.data.cache import TeacherCache
from distsr.launch import main as launch
from distsr.teachers import cache_job
from distsr.teachers.seesr_tiny import write_tiny_seesr

# what the SeeSR teacher prints the first time it does each thing (teachers/seesr.py)
LIVE = "[distsr] SeeSR teacher: running RAM, the text encoder"
SAMPLER = "[distsr] SeeSR teacher: running the 2-step DDPM sampler"
STORED = "[distsr] SeeSR teacher: condition from stored entries"


def path_overrides(section: dict, prefix: str) -> list[str]:
    """key=value overrides pointing a config's teacher section at the tiny parts."""
    ram = section["ram"]
    return [f"{prefix}.sd2_dir={section['sd2_dir']}", f"{prefix}.seesr_dir={section['seesr_dir']}",
            *(f"{prefix}.ram.{k}={v}" for k, v in ram.items())]  # fmt: skip


def test_dry_run_prints_the_full_size_plan_and_each_missing_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights here
    assert launch(["tadsr_seesr", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kind: seesr" in out and "guidance_scale: 5.5" in out and "steps: 50" in out
    assert "hsd_timesteps:\n  - 20\n  - 900\n  - 20" in out
    assert '"bf16": {\n    "enabled": true' in out
    for missing in ("vae", "text_encoder", "tokenizer", "scheduler", "unet", "controlnet",
                    "ram_swin_large_14m.pth", "DAPE.pth", "ram_tag_list.txt"):  # fmt: skip
        assert missing in out.split("# missing files")[1], missing


def test_launch_refuses_missing_weights_naming_each(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch(["tadsr_seesr", "scaling.ray=false"]) == 2
    err = capsys.readouterr().err
    assert "method.teacher.sd2_dir" in err and "method.teacher.seesr_dir" in err
    assert "method.teacher.ram.dape" in err


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory) -> dict:
    return write_tiny_seesr(tmp_path_factory.mktemp("tiny_seesr"))


def cache_tiny(tiny_parts: dict, shards, output) -> str:
    """The cache job (its library, in this process) on configs/cache_seesr_tiny.yaml."""
    cfg = cache_job.load_config(["cache_seesr_tiny", f"shards=[{shards}]", f"output={output}",
                                 *path_overrides(tiny_parts, "teacher")])  # fmt: skip
    summary = cache_job.run_in_process(cfg)
    assert summary["failed"] == {} and summary["samples"] > 0
    return summary["cache_dir"]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (as the cache job's actors), restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_tadsr_seesr_tiny_trains_in_process_from_the_cache(tiny_parts, tiny_shards, tmp_path):
    cache_dir = cache_tiny(tiny_parts, tiny_shards, tmp_path / "cache")
    args = ["tadsr_seesr_tiny", "scaling.ray=false", f"output_dir={tmp_path / 'runs'}",
            f"data.shards=[{tiny_shards}]", f"method.cache_dir={cache_dir}",
            *path_overrides(tiny_parts, "method.teacher")]  # fmt: skip
    assert launch(args) == 0
    run = tmp_path / "runs" / "tadsr_seesr_tiny"
    assert (run / "checkpoints" / "step_00000004").is_dir()
    student = run / "export" / "student.safetensors"
    assert student.is_file()
    from safetensors.torch import load_file

    weights = load_file(str(student))
    assert any(k.startswith("unet.") for k in weights)
    assert any(k.startswith("controlnet.controlnet_cond_embedding.") for k in weights)
    assert TeacherCache(cache_dir).manifest()["samples"] > 0
