"""Everything on object storage: an S3 server on loopback (moto, a real HTTP server speaking the
S3 API) holds the input shards, the teacher cache and a TAD-SR run folder with its checkpoints;
the run is killed (SIGKILL at step 3, after its step-2 checkpoint) and launched again, resumes
from the bucket and finishes. Nothing is written to local disk but temporary files, and only the
killed run's are left. The bucket is read back with boto3, not with the code under test
(pyarrow)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load, save_file

from distsr.data.reader import iter_samples, list_shards
from distsr.models.resshift_unet import UNetModelSwin
from distsr.teachers.cache_job import load_config, run_in_process
from tests.conftest import ROOT, listing, load_job
from tests.ports import patience, start_on_free_ports

pytestmark = pytest.mark.slow
BUCKET = "distsr-test"
TINY_UNET = yaml.safe_load((ROOT / "configs/tadsr_tiny.yaml").read_text())["method"]["teacher"]


def _client(port: int):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip


def _answers(ports: list[int]) -> bool:
    """The server's readiness signal: an S3 call that succeeds."""
    try:
        _client(ports[0]).list_buckets()
    except Exception:  # not up yet (connection refused, reset)
        return False
    return True


def _stop(proc: subprocess.Popen, ports=None) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """``moto_server`` on a free loopback port, a bucket, and this process's environment pointing
    at it (endpoint and dummy credentials: the only way distsr learns them)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"

    def start(ports):
        with open(log, "a") as out:
            return subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(ports[0])],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    proc, (port,) = start_on_free_ports(1, start, _answers, _stop, "moto S3 server",
                                        timeout=patience(60))  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as mp:  # the environment is restored after the module
            for key, value in env.items():
                mp.setenv(key, value)
            client = _client(port)
            client.create_bucket(Bucket=BUCKET)
            yield client
    finally:
        _stop(proc)


def objects(client, prefix: str) -> dict[str, int]:
    """Key (relative to ``prefix``) -> size of every object under ``prefix/``."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) + 1 :]] = item["Size"]
    return found


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def tar_keys(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return list(dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames()))


def launch(work: Path, temp: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    """``python -m distsr.launch`` in an empty folder, its temp folder ``temp``; the finished
    process and its output."""
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "distsr.launch", "tadsr_tiny", *args]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=patience(600))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not finish:\n{proc.communicate()[0][-3000:]}") from None
    return proc, out


def test_shards_cache_and_a_killed_run_live_in_object_storage(s3, photos_dir, tmp_path,
                                                              monkeypatch):  # fmt: skip
    url = f"s3://{BUCKET}"
    torch.manual_seed(0)
    unet = tmp_path / "unet.safetensors"  # an input, as the photos are
    save_file(UNetModelSwin(**TINY_UNET["unet"]).state_dict(), str(unet))
    temp, work = tmp_path / "tmp", tmp_path / "work"
    temp.mkdir()
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this process's temp files
    before = {"tmp_path": listing(tmp_path), "photos": listing(photos_dir)}

    # input shards, written by the shard job's library
    shard_args = [f"inputs=[{photos_dir}]", f"output={url}/shards", "crop_size=32",
                  "crop_mode=random", "random_crops=2", "shard_size=4"]  # fmt: skip
    manifest = load_job("make_shards").main(shard_args)
    stored = objects(s3, "shards")
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) >= 2 and set(stored) == {*names, "manifest.json"}
    assert json.loads(get(s3, "shards/manifest.json"))["complete"] is True
    keys = [k for n in names for k in tar_keys(get(s3, f"shards/{n}"))]
    assert len(keys) == manifest["samples"]
    read = [s["__key__"] for s in iter_samples(f"{url}/shards", scale=4)]  # through WebDataset
    assert read == keys
    assert list_shards([f"{url}/shards/train-00000[01].tar"]) == [
        f"{url}/shards/{n}" for n in names[:2]
    ]

    # the teacher cache, written by the cache job into the bucket
    cfg = load_config([str(ROOT / "configs/cache_resshift_tiny.yaml"), f"output={url}/cache",
                       f"teacher.unet_checkpoint={unet}", f"shards=[{url}/shards]",
                       "batch_size=4"])  # fmt: skip
    summary = run_in_process(cfg)
    cache = summary["cache_dir"]
    fingerprint = summary["fingerprint"]
    assert cache == f"{url}/cache/{fingerprint}" and summary["cached"] == len(names)
    cached = objects(s3, f"cache/{fingerprint}")
    assert set(cached) == {*names, "teacher.json", "manifest.json"}
    entries = json.loads(get(s3, f"cache/{fingerprint}/manifest.json"))["shards"]
    for name in names:  # same keys, and the input identity read from the bucket
        assert tar_keys(get(s3, f"cache/{fingerprint}/{name}")) == tar_keys(
            get(s3, f"shards/{name}")
        )
        assert entries[name]["input"]["bytes"] == stored[name]
        assert entries[name]["input"]["shards_fingerprint"] == manifest["fingerprint"]
    assert run_in_process(cfg)["written"] == []  # a re-run finds every shard cached

    # TAD-SR from the cached teacher, killed after its step-2 checkpoint, launched again
    args = [f"output_dir={url}/runs", "name=tadsr", f"data.shards=[{url}/shards]",
            f"method.cache_dir={cache}", f"method.teacher.unet_checkpoint={unet}",
            "scaling.ray=false", "scaling.num_workers=1", "engine.zero_stage=0",
            "engine.max_steps=3", "engine.checkpoint.every_steps=2", "engine.log_every=1",
            "engine.preview_every=0", "data.batch_size=2", "data.shuffle=4",
            "debug.fail_at_step=3",
            "debug.fail_mode=sigkill"]  # fmt: skip
    killed, out = launch(work, temp, args)
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    run = objects(s3, "runs/tadsr")
    assert ".injected_failure_step3" in run and "checkpoints/step_00000002/client_state.pt" in run
    assert not any(k.startswith("export/") for k in run)
    resumed, out = launch(work, temp, args)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed from {temp}" in out and "at step 2" in out

    run = objects(s3, "runs/tadsr")
    steps = sorted({k.split("/")[1] for k in run if k.startswith("checkpoints/")})
    assert steps == ["step_00000002", "step_00000003"]
    for step in steps:  # every file of a DeepSpeed checkpoint and the client state
        assert f"checkpoints/{step}/client_state.pt" in run
        assert any(k.startswith(f"checkpoints/{step}/student/") for k in run)
    status = json.loads(get(s3, "runs/tadsr/status.json"))
    assert status["state"] == "finished" and status["step"] == 3 and status["restarts"] == 1
    # what the killed run pushed (steps 1-2, with its checkpoint), then the resumed run's 3
    logged = get(s3, "runs/tadsr/metrics.jsonl").splitlines()
    logged = [json.loads(line)["step"] for line in logged]
    assert logged == [1, 2, 3]
    assert {"config.yaml", "run.yaml"} <= set(run)
    student = load(get(s3, "runs/tadsr/export/student_ema.safetensors"))
    assert student and all(torch.isfinite(v).all() for v in student.values())

    # nothing on local disk but temp files: the killed run's temp copy is all that is left
    assert listing(photos_dir) == before["photos"]
    now = listing(tmp_path)
    assert all(p.startswith("tmp/") for p in set(now) - set(before["tmp_path"])), sorted(now)
    assert all(now[p] == stat for p, stat in before["tmp_path"].items() if p not in (".", "tmp"))
    assert list(work.iterdir()) == []
    left = sorted(p.name for p in temp.iterdir() if p.name.startswith("distsr-"))
    assert len(left) == 1 and left[0].startswith(f"distsr-run-{killed.pid}-"), left
