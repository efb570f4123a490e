"""``python -m distsr.launch tadsr_seesr``: the full-size plan without weights or GPUs, and the tiny
variant end to end (tiny parts written as files -> the cache job from configs/cache_seesr_tiny.yaml
-> TAD-SR training from the cache only, with a checkpoint written): in process, and as the users'
command, ``ray job submit --working-dir . -- python -m distsr.launch tadsr_seesr_tiny ...`` on a
``ray start --head`` cluster with token authentication."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from distsr.data.cache import TeacherCache
from distsr.launch import main as launch
from distsr.teachers import cache_job
from distsr.teachers.seesr_tiny import write_tiny_seesr
from tests.conftest import ROOT
from tests.test_cluster import EXCLUDES, RAY, ray_head, steps

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


def submit(url: str, env: dict, *command: str) -> str:
    """``ray job submit --working-dir <repo> -- python COMMAND``; returns the job's log."""
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           sys.executable, *command]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    return log


@pytest.mark.slow
def test_ray_job_submit_tadsr_seesr_tiny_trains_from_the_cache(tiny_parts, tiny_shards, tmp_path):
    """The users' command on a token-protected cluster: the cache job first (it runs RAM, the
    text encoder and the sampler), then 2 Ray Train workers that only read the cache."""
    cache_root, runs = tmp_path / "cache", tmp_path / "runs"
    with ray_head(tmp_path) as (url, env, gcs):
        cache_log = submit(url, env, "jobs/cache_teacher.py", "cache_seesr_tiny",
                           f"shards=[{tiny_shards}]", f"output={cache_root}",
                           *path_overrides(tiny_parts, "teacher"))  # fmt: skip
        (cache_dir,) = [p.parent for p in cache_root.glob("*/teacher.json")]
        train_log = submit(url, env, "-m", "distsr.launch", "tadsr_seesr_tiny",
                           f"output_dir={runs}", f"data.shards=[{tiny_shards}]",
                           f"method.cache_dir={cache_dir}", "scaling.num_workers=2",
                           *path_overrides(tiny_parts, "method.teacher"))  # fmt: skip
    assert LIVE in cache_log and SAMPLER in cache_log, cache_log[-4000:]
    attached = re.search(r"running on the cluster at RAY_ADDRESS=(\S+):", train_log)
    assert attached and attached.group(1).endswith(f":{gcs}"), train_log[-4000:]
    # the workers took the condition from the cache; none ran RAM, the text encoder or sampler
    assert STORED in train_log, train_log[-4000:]
    assert LIVE not in train_log and SAMPLER not in train_log, train_log[-4000:]
    run = runs / "tadsr_seesr_tiny"
    assert steps(run)[-1] == 4
    assert (run / "step_00000004" / "COMPLETE").is_file()
    assert (run / "export" / "student.safetensors").is_file()
    assert TeacherCache(cache_dir).manifest()["samples"] > 0
