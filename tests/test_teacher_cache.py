"""The teacher-output cache: the Ray caching job on real shards, the joined reader, and the
Live/Cached teacher sources (a tiny pixel-space ResShift teacher with random weights).
Ray-free cache tests (other teacher kinds, draws, input validity): test_cache_targets.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import save_file

from distsr.config import ConfigError
from distsr.data.cache import TeacherCache
from distsr.data.config import DataConfig
from distsr.data.reader import make_train_loader
from distsr.models.resshift_unet import UNetModelSwin
from distsr.teachers import build_teacher
from distsr.teachers.noise import noise_for
from distsr.teachers.source import CachedTeacher, LiveTeacher
from tests.conftest import ROOT, load_job

job = load_job("cache_teacher")
TINY_UNET = yaml.safe_load((ROOT / "configs/resshift_tiny.yaml").read_text())["method"]["unet"]
BATCH = 4  # teacher batch of the job; every test shard holds a multiple of it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Actors run torch on one thread; so does this process (bit-equal kernels, no
    oversubscription of the 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subset_shards(src: Path, out: Path, shards: int, per_shard: int) -> Path:
    """The first ``per_shard`` samples of the first ``shards`` input shards (same names)."""
    out.mkdir(parents=True)
    for path in sorted(src.glob("*.tar"))[:shards]:
        with wds.TarWriter(str(out / path.name), encoder=False) as sink:
            for i, sample in enumerate(wds.WebDataset(str(path), shardshuffle=False)):
                if i == per_shard:
                    break
                sink.write({k: v for k, v in sample.items() if k == "__key__" or "." in k})
    return out


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames()))


def save_unet(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(UNetModelSwin(**TINY_UNET).state_dict(), str(path))
    return path


def job_args(ckpt: Path, shards: Path, output: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/cache_resshift_tiny.yaml"), f"teacher.unet_checkpoint={ckpt}",
            f"shards=[{shards}]", f"output={output}", f"batch_size={BATCH}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory) -> Path:
    return save_unet(tmp_path_factory.mktemp("teacher") / "unet.safetensors", seed=0)


@pytest.fixture(scope="module")
def inputs(tiny_shards, tmp_path_factory) -> Path:
    return subset_shards(tiny_shards, tmp_path_factory.mktemp("in") / "shards", 3, 8)


@pytest.fixture(scope="module")
def cached(ray_cluster, unet_ckpt, inputs, tmp_path_factory) -> dict:
    """The job, run once on 3 shards x 8 samples with a pool of 2 actors."""
    out = tmp_path_factory.mktemp("cache")
    return job.main(job_args(unet_ckpt, inputs, out, "num_actors=2"))


def teacher_cfg(ckpt: Path, *extra: str):
    return job.load_config(job_args(ckpt, Path("unused"), Path("unused"), *extra)).teacher


def joined_cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(shards=[str(shards)], **{"batch_size": BATCH, "shuffle": 0, **kw})


def joined_loader(data_cfg: DataConfig, cache_dir, steps: int = 1):
    """The training stream with the teacher-cache stage (rank 0 of 1)."""
    return make_train_loader(data_cfg, rank=0, world_size=1, steps=steps, seed=0,
                             cache=TeacherCache(cache_dir))  # fmt: skip


def read_manifest(cache_dir) -> dict:
    return TeacherCache(cache_dir).manifest()


# ---------------------------------------------------------------- the teacher


def test_teacher_samples_from_its_prior_and_exposes_one_step_calls(unet_ckpt):
    teacher = build_teacher(teacher_cfg(unet_ckpt))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    cond = teacher.prepare(torch.rand(2, 3, 8, 8))
    assert cond["z_y"].shape == (2, 3, 32, 32) and torch.equal(cond["lq"], cond["z_y"])
    noise = noise_for(["a", "b"], cond["z_y"].shape[1:], seed=0)
    assert torch.equal(noise[1], noise_for(["b"], (3, 32, 32), seed=0)[0])  # per sample
    z = teacher.prior(cond, noise)
    for t in reversed(range(4)):  # the SinSR chain by hand, from z_T = prior(cond, noise)
        x0_hat = teacher.denoise(z, t, cond)
        z = teacher.diffusion.deterministic_step(lambda x, _t, x0=x0_hat: x0, z, cond["z_y"], t)
        z = z["sample"]
    assert torch.allclose(teacher.sample(cond, noise), z, atol=1e-6)
    image = teacher.decode(z)
    assert image.shape == (2, 3, 32, 32) and image.min() >= 0 and image.max() <= 1
    z_t = teacher.prior(cond, noise).requires_grad_()
    feats = teacher.features(z_t, 3, cond, [1, "mid"])
    assert [f.shape[1] for f in feats] == [32, 64]
    sum(f.square().mean() for f in feats).backward()
    assert z_t.grad.abs().sum() > 0  # the TAD-SR discriminator backpropagates to the student

    stochastic = build_teacher(teacher_cfg(unet_ckpt, "teacher.sampler=stochastic"))
    draws = noise_for(["a", "b"], (3, 32, 32), seed=0, tensors=stochastic.noise_tensors)
    assert draws.shape == (5, 2, 3, 32, 32) and torch.equal(draws[0], noise)
    assert torch.equal(stochastic.sample(cond, draws), stochastic.sample(cond, draws))
    with pytest.raises(ValueError, match="stochastic sampler needs noise"):
        stochastic.sample(cond, noise)


# ---------------------------------------------------------------- the job


def test_job_config_from_overrides_only_and_its_errors(unet_ckpt):
    cfg = job.load_config([f"teacher.unet_checkpoint={unet_ckpt}", "teacher.autoencoder.kind=pixel",
                           "shards=[a/b]", "output=c", "num_actors=3"])  # fmt: skip
    assert cfg.num_actors == 3 and cfg.teacher.unet["model_channels"] == 160  # official kwargs
    with pytest.raises(ConfigError) as err:
        job.load_config([str(ROOT / "configs/cache_resshift_tiny.yaml"), "batch_size=0",
                         "teacher.sampler=ddim", "draws=0"])  # fmt: skip
    problems = dict(err.value.problems)
    assert {"batch_size", "teacher.sampler", "teacher.unet_checkpoint", "draws"} <= set(problems)


def test_job_caches_every_key_once_in_input_order(cached, inputs):
    cache_dir = Path(cached["cache_dir"])
    assert cached["failed"] == {} and cached["written"] == sorted(p.name for p in inputs.iterdir())
    cache = TeacherCache(cache_dir)
    assert cache_dir.name == cached["fingerprint"] == cache.fingerprint
    assert (cache.outputs, cache.stored, cache.draws) == (("z0",), ("z_y",), 1)
    manifest = cache.manifest()
    assert manifest["samples"] == 24 and set(manifest["shards"]) == set(cached["written"])
    for name in cached["written"]:
        keys = tar_keys(cache_dir / name)
        assert keys == tar_keys(inputs / name) and len(keys) == len(set(keys)) == 8
        assert manifest["shards"][name]["samples"] == 8
        sample = next(iter(wds.WebDataset(str(cache_dir / name), shardshuffle=False).decode()))
        assert sample["z0.npy"].dtype == np.float16 and sample["z0.npy"].shape == (1, 3, 32, 32)
        assert sample["z_y.npy"].shape == sample["z_gt.npy"].shape == (3, 32, 32)
        assert sample["seed.npy"].dtype == np.int64 and sample["seed.npy"].shape == (1,)
        assert manifest["shards"][name]["input"]["sha256"]
    assert not list(cache_dir.glob("*.tmp"))


# ---------------------------------------------------------------- live vs cached


def test_cached_and_live_teachers_give_identical_targets(cached, unet_ckpt, inputs):
    cache_dir = Path(cached["cache_dir"])
    teacher = build_teacher(teacher_cfg(unet_ckpt))
    cache = TeacherCache(cache_dir)
    assert cache.noise_seed == 0
    live, source = LiveTeacher(teacher, seed=0, fresh_noise=False), CachedTeacher(cache, teacher)
    assert live.fingerprint == source.fingerprint == cached["fingerprint"]
    # no shuffle + shards of whole teacher batches: each batch is one batch of the job
    loader = joined_loader(joined_cfg(inputs), cache_dir, steps=4)
    seen = set()
    for batch in loader:
        want, got = live.targets(batch), source.targets(batch)
        assert set(want) == set(got) == {"cond", "noise", "z0_tch", "z_gt"}
        for name in ("noise", "z0_tch", "z_gt"):
            assert torch.equal(want[name], got[name]), name
        assert set(want["cond"]) == set(got["cond"]) == {"z_y", "lq"}
        for name in want["cond"]:
            assert torch.equal(want["cond"][name], got["cond"][name]), name
        assert torch.equal(got["z0_tch"], got["z0_tch"].half().float())  # fp16 values
        assert not torch.equal(got["z0_tch"], got["cond"]["z_y"])  # the trajectory did something
        seen.update(batch["__key__"])
    assert len(seen) >= 8 and loader.skipped == 0


def test_cache_of_another_teacher_is_refused(cached, unet_ckpt, tmp_path):
    cache = TeacherCache(cached["cache_dir"])
    other = build_teacher(teacher_cfg(save_unet(tmp_path / "other.safetensors", seed=1)))
    with pytest.raises(ValueError, match=r"differ in: weights \(") as err:
        CachedTeacher(cache, other)
    assert "sampler" not in str(err.value) and cached["fingerprint"] in str(err.value)
    stochastic = build_teacher(teacher_cfg(unet_ckpt, "teacher.sampler=stochastic"))
    with pytest.raises(ValueError, match="differ in: sampler .'deterministic' vs 'stochastic'"):
        cache.check(stochastic)
    steps = build_teacher(teacher_cfg(unet_ckpt, "teacher.schedule.steps=5"))
    with pytest.raises(ValueError, match=r"schedule \(steps: 4 vs 5\)"):
        cache.check(steps)


# ---------------------------------------------------------------- kill and resume


def wait_until(ready, proc: subprocess.Popen, timeout: float, what: str):
    """``ready()``'s first truthy value, polled until ``timeout`` or the job's exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        value = ready()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s (job exit code {proc.poll()})")


def test_killed_job_resumes_with_every_key_once(ray_cluster, unet_ckpt, tiny_shards, tmp_path):
    """The last input shard is a named pipe nobody writes to: the job caches the first three
    shards, then blocks inside the fourth (its temp file open) until it is killed, whatever the
    machine's load. The re-run reads the real shard and must keep the finished ones."""
    inputs = subset_shards(tiny_shards, tmp_path / "in", 4, 8)
    last = sorted(inputs.iterdir())[-1]
    real = last.read_bytes()
    last.unlink()
    os.mkfifo(last)
    output = tmp_path / "cache"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}

    def blocked_in_last_shard():
        for manifest in output.glob("*/manifest.json"):
            cache_dir = manifest.parent
            if len(read_manifest(cache_dir).get("shards", {})) == 3 and list(
                cache_dir.glob(f"{last.name}.*.tmp")
            ):
                return cache_dir
        return None

    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs/cache_teacher.py"), *job_args(unet_ckpt, inputs,
             output, "num_actors=1")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            cache_dir = wait_until(blocked_in_last_shard, proc, 120, "3 finished shards")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    done = set(read_manifest(cache_dir)["shards"])
    assert last.name not in done and len(done) == 3
    deadline = time.monotonic() + 30  # Ray kills the dead driver's actor: wait for its CPU back
    while ray_cluster.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) >= 4, "the dead job's actor kept CPUs"
    last.unlink()
    last.write_bytes(real)
    kept = {name: (cache_dir / name).stat().st_mtime_ns for name in done}
    summary = job.main(job_args(unet_ckpt, inputs, output))
    assert set(summary["already_done"]) == done and summary["failed"] == {}
    assert summary["written"] == [last.name]
    assert {name: (cache_dir / name).stat().st_mtime_ns for name in done} == kept
    for name in sorted(p.name for p in inputs.iterdir()):
        assert tar_keys(cache_dir / name) == tar_keys(inputs / name)
    assert read_manifest(cache_dir)["samples"] == 32
    assert not list(output.rglob("*.tmp"))  # the killed writer's temp file is gone


# ---------------------------------------------------------------- the joined reader


def test_joined_reader_raises_on_a_key_mismatch(cached, inputs, tmp_path):
    cache_dir = tmp_path / Path(cached["cache_dir"]).name
    cache_dir.mkdir()
    for path in Path(cached["cache_dir"]).iterdir():
        (cache_dir / path.name).write_bytes(path.read_bytes())
    names = sorted(p.name for p in inputs.iterdir())
    (cache_dir / names[1]).write_bytes((cache_dir / names[0]).read_bytes())  # wrong pairing
    loader = joined_loader(joined_cfg(inputs / names[1]), cache_dir)
    with pytest.raises(ValueError, match="out of step") as err:
        next(iter(loader))
    message = str(err.value)
    assert str(inputs / names[1]) in message and str(cache_dir / names[1]) in message
    assert tar_keys(inputs / names[1])[0] in message and tar_keys(inputs / names[0])[0] in message


def test_joined_reader_refuses_random_crops_and_missing_shards(cached, inputs, tmp_path):
    cache_dir = Path(cached["cache_dir"])
    with pytest.raises(ValueError, match="gt_size=16 would random-crop"):
        joined_loader(joined_cfg(inputs, gt_size=16), cache_dir)
    assert joined_loader(joined_cfg(inputs, gt_size=32), cache_dir).steps == 1
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "train-000042.tar").write_bytes((inputs / "train-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="lacks 1 of 4 input shard.*train-000042.tar"):
        joined_loader(DataConfig(shards=[str(inputs), str(extra)]), cache_dir)


def rewrite(src: Path, dst: Path, change) -> list[str]:
    """Copy shard ``src`` to ``dst`` with ``change(i, sample)`` applied; returns the keys."""
    keys = []
    with wds.TarWriter(str(dst), encoder=False) as sink:
        for i, sample in enumerate(wds.WebDataset(str(src), shardshuffle=False)):
            sample = {k: v for k, v in sample.items() if k == "__key__" or "." in k}
            change(i, sample)
            sink.write(sample)
            keys.append(sample["__key__"])
    return keys


def test_corrupt_input_is_skipped_in_both_streams_and_a_failing_shard_is_reported(
    ray_cluster, unet_ckpt, inputs, tmp_path
):
    shards = tmp_path / "in"
    shards.mkdir()

    def garble(i, sample):  # sample 2 cannot be decoded
        if i == 2:
            sample["lq.png"] = b"\x89PNG\r\n\x1a\n garbage"

    def wrong_scale(i, sample):  # lq of a x2 data set: the teacher (x4) must refuse it
        sample["lq.png"] = sample["gt.png"]

    keys = rewrite(inputs / "train-000000.tar", shards / "train-000000.tar", garble)
    rewrite(inputs / "train-000001.tar", shards / "train-000001.tar", wrong_scale)
    summary = job.main(job_args(unet_ckpt, shards, tmp_path / "cache", "retries=1"))
    assert summary["written"] == ["train-000000.tar"]
    assert list(summary["failed"]) == ["train-000001.tar"]
    assert "is not 4x lq" in summary["failed"]["train-000001.tar"]
    cache_dir = Path(summary["cache_dir"])
    entry = read_manifest(cache_dir)["shards"]["train-000000.tar"]
    assert entry["samples"] == 7 and entry["skipped"] == 1
    assert tar_keys(cache_dir / "train-000000.tar") == keys[:2] + keys[3:]

    loader = joined_loader(joined_cfg(shards / "train-000000.tar"), cache_dir, steps=4)
    teacher = build_teacher(teacher_cfg(unet_ckpt))
    source = CachedTeacher(TeacherCache(cache_dir), teacher)
    seen = []
    for batch in loader:
        got = source.targets(batch)  # pairing: the cached latents are of this batch's images
        z_y = teacher.prepare(batch["lq"])["z_y"]
        assert torch.equal(got["cond"]["z_y"], z_y.half().float())
        assert torch.equal(got["z_gt"], (batch["gt"] * 2 - 1).half().float())
        seen += batch["__key__"]
    assert set(seen) == set(keys) - {keys[2]}
    assert loader.skipped == 2  # 16 samples = 2 passes over the bad sample + 2 samples
