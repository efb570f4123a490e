"""A damaged teacher-cache shard during training: one cache sample's output is not a .npy any
more and the shard is cut short inside a later sample (a copy that stopped half way). The run
must finish, count every input sample it had to drop as skipped, and drop nothing else.

What is lost is computed here from the tar files alone (``tarfile`` and ``numpy``): the input
samples whose cache entry is missing or unreadable. The stream is one shard read in order
(``shuffle: 0``, batch 1), so the skip count each step logs is the number of damaged samples
the reader has passed by then."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distsr.data.cache import TeacherCache
from distsr.data.config import DataConfig
from distsr.data.reader import make_train_loader
from distsr.launch import run
from distsr.models.sr import build_sr
from distsr.runconfig import absolutize_paths, parse_run_config
from distsr.teachers.cache_job import load_config, run_in_process
from tests.conftest import load_job

FIELDS = {"z0.npy", "z_gt.npy", "seed.npy"}  # a pixel-output cache sample (``decode=true``)
CORRUPT, CUT = 3, 9  # cache sample 3 gets a garbled z0.npy; the file ends inside sample 9


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cached(photos_dir, tmp_path_factory) -> dict:
    """One input shard (25 crops of one photo), a tiny EDSR teacher and its decoded cache."""
    root = tmp_path_factory.mktemp("faults")
    (root / "photo").mkdir()
    shutil.copy(photos_dir / "astronaut.png", root / "photo")
    shards = root / "shards"
    load_job("make_shards").main([f"inputs=[{root / 'photo'}]", f"output={shards}",
                                  "crop_size=32", "stride=128", "shard_size=64"])  # fmt: skip
    torch.manual_seed(0)
    teacher = root / "edsr.pth"
    torch.save(build_sr("edsr", scale=4, num_feat=8, num_block=1).state_dict(), teacher)
    job = ["teacher.kind=regression", f"teacher.model_files=[{teacher}]", "decode=true",
           f"shards=[{shards}]", f"output={root / 'cache'}", "batch_size=8"]  # fmt: skip
    summary = run_in_process(load_config(job))
    assert not summary["failed"] and summary["samples"] == 25
    return {"shards": shards, "teacher": str(teacher), "cache_dir": summary["cache_dir"]}


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def damage(src: Path, dst: Path) -> None:
    """``src`` with cache sample CORRUPT's z0.npy garbled, cut in the middle of sample CUT's
    z0.npy data."""
    members = tar_members(src)
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))
    with tarfile.open(dst, "w") as tar:
        for name, data in members:
            if name == f"{keys[CORRUPT]}.z0.npy":
                data = b"\x93NUMPY garbled"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(dst) as tar:
        cut = tar.getmember(f"{keys[CUT]}.z0.npy")
    dst.write_bytes(dst.read_bytes()[: cut.offset_data + cut.size // 2])


def readable_entries(path: Path) -> set[str]:
    """Keys of the cache samples whose every field is in the (cut) file and loads as .npy."""
    entries: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r|") as tar:  # a stream: reads up to the cut, then raises
        try:
            for member in tar:
                key, field = member.name.split(".", 1)
                entries.setdefault(key, {})[field] = tar.extractfile(member).read()
        except tarfile.ReadError:
            pass
    good = set()
    for key, fields in entries.items():
        try:
            ok = set(fields) == FIELDS and all(
                np.load(io.BytesIO(b), allow_pickle=False) is not None for b in fields.values()
            )
        except ValueError:
            ok = False
        if ok:
            good.add(key)
    return good


def input_keys(shards: Path) -> list[str]:
    (path,) = sorted(shards.glob("*.tar"))
    return list(dict.fromkeys(name.split(".", 1)[0] for name, _ in tar_members(path)))


def skips_by_step(keys: list[str], usable: set[str], steps: int) -> list[int]:
    """Batch size 1: damaged samples passed (in shard order, read after read) up to each step."""
    stream, lost, out = iter(keys * 2), 0, []
    for _ in range(steps):
        for key in stream:
            if key in usable:
                break
            lost += 1
        out.append(lost)
    return out


def run_dict(root: Path, cached: dict, cache_dir: Path, steps: int) -> dict:
    """DTKD (L1 to gt + L1 to the teacher) with a tiny EDSR student, in this process."""
    return {
        "name": "faults", "recipe": "dtkd", "seed": 0, "output_dir": str(root),
        "method": {"teacher": {"kind": "regression", "model_files": [cached["teacher"]],
                               "scale": 4},
                   "cache_dir": str(cache_dir),
                   "student": {"arch": "edsr", "preset": "baseline", "scale": 4,
                               "kwargs": {"num_feat": 8, "num_block": 1}},
                   "kd_loss": {"name": "l1"}, "ramp": {"lambda_max": 1.0, "end_step": 1}},
        "data": {"shards": [str(cached["shards"])], "batch_size": 1, "num_workers": 0,
                 "shuffle": 0, "gt_size": None, "scale": 4},
        "engine": {"max_steps": steps, "zero_stage": 0, "precision": "fp32", "log_every": 1,
                   "tensorboard": False, "preview_every": 0, "ema_decay": None,
                   "optimizer": {"name": "adam", "lr": 1.0e-3},
                   "checkpoint": {"every_steps": steps, "keep": 1}},
        "scaling": {"ray": False, "num_workers": 1},
    }  # fmt: skip


def test_a_garbled_and_cut_cache_shard_costs_exactly_its_damaged_samples(cached, tmp_path):
    cache_dir = tmp_path / Path(cached["cache_dir"]).name
    shutil.copytree(cached["cache_dir"], cache_dir)
    (tar,) = sorted(cache_dir.glob("*.tar"))
    damage(Path(cached["cache_dir"]) / tar.name, tar)

    keys = input_keys(cached["shards"])
    readable = readable_entries(tar)
    usable = [k for k in keys if k in readable]
    lost = len(keys) - len(usable)
    assert len(keys) == 25 and lost == 1 + (25 - CUT)  # the garbled one and the cut tail
    # the first read whole, then 2 samples of the second: every damaged sample of the first
    # read is passed, none of the second's (its first damaged one is sample CORRUPT = 3)
    steps = len(usable) + 2
    expected = skips_by_step(keys, set(usable), steps)
    assert expected[-1] == lost

    # the joined stream itself: the usable samples, in order, and the lost ones counted
    data = DataConfig(shards=[str(cached["shards"])], batch_size=1, shuffle=0)
    loader = make_train_loader(data, rank=0, world_size=1, steps=steps, seed=0,
                               cache=TeacherCache(cache_dir))  # fmt: skip
    seen, counts = [], []
    for batch in loader:
        seen += batch["__key__"]
        counts.append(batch["skipped"])
    assert seen == usable + usable[:2]
    assert np.cumsum(counts).tolist() == expected and loader.skipped == lost

    # training on it: the run finishes, and the run's records count the same samples
    final = run(absolutize_paths(parse_run_config(run_dict(tmp_path, cached, cache_dir, steps))))
    run_dir = tmp_path / "faults"
    assert final["step"] == steps and final["skipped_samples"] == lost
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["skipped_samples"] == lost
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["skipped_samples"] for r in records] == expected
    assert all(np.isfinite(r["loss/student"]) for r in records)
    state = torch.load(run_dir / "checkpoints" / f"step_{steps:08d}" / "client_state.pt",
                       weights_only=False)  # fmt: skip
    assert state["samples_seen"] == steps and state["skipped_samples"] == lost
