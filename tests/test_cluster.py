"""The cluster paths on the real stack: `ray job submit` to a `ray start --head` cluster with
token authentication, jobs/slurm.py on submitit's local executor surviving a preemption, and the
cluster configs in cluster/."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, load_job, tiny_overrides
from tests.ports import patience, start_on_free_ports

RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = ["shards/", "runs/", "checkpoints/", "cache/", ".git/"]
slurm = load_job("slurm")


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines]


def head_env(token: Path, gcs: int) -> dict:
    return slurm.ray_env(token, RAY_ADDRESS=f"127.0.0.1:{gcs}", **slurm.HEAD_ENV)


def stop_node(proc: subprocess.Popen, ports: list[int]) -> None:
    """Stop a node by its process group; a head (its GCS port first) is forgotten too."""
    slurm.stop(proc, grace=patience(60))
    slurm.forget_cluster(ports[0])


@contextlib.contextmanager
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict, int]]:
    """`ray start --head --block` with token auth, up once its agent reports healthy, its job
    API answers and its own processes listen on the ports it was given (``tests.ports``: a
    port taken meanwhile means a restart on new ones). SIGTERM stops exactly this node's
    processes (no global `ray stop`, which would also kill other Ray clusters here)."""
    token = slurm.write_token(tmp_path / "ray_token")
    # a temp dir of its own: Ray's job supervisor sends a job's driver to the cluster started last
    # under a shared one (another test's), and Ray's socket paths need it short
    ray_tmp = tempfile.mkdtemp(prefix="ray-")

    def start(ports: list[int]) -> subprocess.Popen:
        gcs, dashboard, agent, client = ports
        # every port that has a fixed default is chosen here: a second Ray on this machine
        # (another test, the demo) holds the defaults
        cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
               f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               f"--ray-client-server-port={client}", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", f"--temp-dir={ray_tmp}"]  # fmt: skip
        return slurm.spawn(cmd, head_env(token, gcs), log=tmp_path / "ray_head.log")

    def ready(ports: list[int]) -> bool:
        _, dashboard, agent, _ = ports
        return slurm.agent_healthy("127.0.0.1", agent) and slurm.job_api_answers(
            f"http://127.0.0.1:{dashboard}", token
        )

    head, ports = start_on_free_ports(4, start, ready, stop_node, "the Ray head", patience(300))
    gcs, dashboard = ports[:2]
    try:
        yield f"http://127.0.0.1:{dashboard}", head_env(token, gcs), gcs
    finally:
        stop_node(head, ports)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert head.returncode is not None


@pytest.mark.slow
def test_ray_job_submit_trains_on_a_token_protected_cluster(tiny_shards, tmp_path):
    overrides = tiny_overrides(
        tmp_path, tiny_shards, "name=submitted", "engine.max_steps=4", "engine.log_every=1",
        "engine.checkpoint.every_steps=2",
    )  # fmt: skip
    with ray_head(tmp_path) as (url, env, gcs):
        submit = [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
                  sys.executable, "-m", "distsr.launch", "resshift_tiny", *overrides]  # fmt: skip
        intruder = {**env, "RAY_AUTH_TOKEN": "0" * 64}  # the env token wins over the file
        refused = subprocess.run([RAY, "job", "list", "--address", url], env=intruder,
                                 capture_output=True, text=True, timeout=patience(120))  # fmt: skip
        assert refused.returncode != 0 and "AuthenticationError" in refused.stderr, refused.stdout
        done = subprocess.run(submit, env=env, capture_output=True, text=True,
                              timeout=patience(400))  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log
    attached = re.search(r"running on the cluster at RAY_ADDRESS=(\S+):", log)
    assert attached and attached.group(1).endswith(f":{gcs}"), log[-4000:]  # ours, not a new one
    run_dir = tmp_path / "submitted"
    assert steps(run_dir)[-1] == 4
    assert (run_dir / "step_00000004" / "client_state.pt").exists()


def task_pid(job) -> int:
    """The submitit task (where SLURM would signal), as it announces itself in the job's log."""
    pids = re.findall(r"\(task pid (\d+)\)", job.stdout() or "")
    assert pids, job.stdout()
    return int(pids[-1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.mark.slow
def test_slurm_local_job_is_preempted_requeued_and_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "preempted"
    overrides = tiny_overrides(
        tmp_path, tiny_shards, "name=preempted", "engine.max_steps=10", "engine.log_every=1",
        "engine.checkpoint.every_steps=2", "scaling.num_workers=1",
    )  # fmt: skip
    job = slurm.submit(["resshift_tiny", "--local", "--cpus-per-task", "4", "--time", "30",
                        "--folder", str(tmp_path / "submitit"), "--", *overrides])  # fmt: skip
    try:
        slurm.wait_until(lambda: max(steps(run_dir), default=0) >= 4,
                         "step 4 (after a checkpoint)", patience(300), job._process)  # fmt: skip
        os.kill(task_pid(job), signal.SIGUSR2)  # submitit's preemption/timeout signal
        slurm.wait_until(job.done, "the requeued job to finish", patience(400))
    finally:
        if not job.done():
            job.cancel()
    out = job.stdout()
    assert job.result() == 0, out[-4000:]
    assert "preempted or timed out" in out and "Requeued job" in out
    resumed = re.findall(r"resumed from \S+ at step (\d+)", out)
    assert resumed and int(resumed[-1]) >= 2, out[-4000:]
    logged = steps(run_dir)
    assert logged[-1] == 10 and logged.count(10) == 1
    assert (run_dir / "step_00000010" / "client_state.pt").exists()
    gcs = slurm.RayPorts.for_job(job.job_id).gcs
    assert port_is_free(gcs)  # the job's Ray is gone, and no Ray process is pointed at it
    latest = slurm.latest_cluster_file()
    assert not latest.exists() or not latest.read_text().strip().endswith(f":{gcs}")


def test_job_ports_do_not_collide_and_stay_below_the_ephemeral_range():
    blocks = [slurm.RayPorts.for_job(str(job_id)) for job_id in range(4000, 4000 + 100)]
    assert len({p.base for p in blocks}) == 100
    for p in blocks:
        ports = [p.base, p.base + 1, p.base + 2]
        ports += [int(flag.split("=")[1]) for flag in p.node_flags()]
        assert min(ports) > 1024 and max(ports) < 32768
        assert max(ports) < p.base + slurm.PORTS_PER_SLOT
    assert slurm.RayPorts.for_job("123_4").base != slurm.RayPorts.for_job("124_4").base


def test_slurm_cli_checks_before_submitting(capsys):
    assert slurm.parse_minutes("90") == 90
    assert slurm.parse_minutes("01:30:00") == 90
    assert slurm.parse_minutes("1-00:00:00") == 1440
    with pytest.raises(ValueError, match="--time"):
        slurm.parse_minutes("soon")
    assert slurm.main(["resshift_tiny", "--local", "--nodes", "2"]) == 2
    assert "--nodes 1" in capsys.readouterr().err
    assert slurm.main(["no_such_config", "--local"]) == 2
    assert "no_such_config" in capsys.readouterr().err
    assert slurm.main(["resshift_tiny", "--dry-run", "--", "engine.max_steps=3"]) == 0
    assert "-m distsr.launch resshift_tiny engine.max_steps=3" in capsys.readouterr().out
    assert slurm.main(["x", "--job", "jobs/no_such_job.py", "--local"]) == 2


def yaml_strings(node) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from yaml_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from yaml_strings(value)
    elif isinstance(node, str):
        yield node


def launched_configs(text: str) -> list[str]:
    return re.findall(r"distsr\.launch\s+(\S+)", text)


def test_ray_cluster_launcher_config():
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) == 1 and gpu_types[0] != cfg["head_node_type"]
    install = re.search(r"^\s+(pip install .*)$", (ROOT / "README.md").read_text(), re.M)
    assert install and any(install.group(1) in cmd for cmd in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert {"runs", "shards", "checkpoints", "cache"} <= set(cfg["rsync_exclude"])


def test_rayjob_manifest_names_an_existing_config():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "distsr.launch"]
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] and set(EXCLUDES[:4]) <= set(env["excludes"])
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["rayVersion"].startswith("2.60")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    limits = [
        c["resources"]["limits"] for g in workers for c in g["template"]["spec"]["containers"]
    ]
    assert any(int(lim.get("nvidia.com/gpu", 0)) > 0 for lim in limits)


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml"])
def test_cluster_entrypoints_name_configs_in_configs_dir(name):
    text = (ROOT / "cluster" / name).read_text()
    strings = " ".join(yaml_strings(yaml.safe_load(text)))
    named = launched_configs(strings) + launched_configs(text)  # commands and usage comments
    assert named or name == "ray-cluster.yaml"
    missing = sorted({n for n in named if not (ROOT / "configs" / f"{n}.yaml").exists()})
    assert not missing, f"cluster/{name} launches configs missing from configs/: {missing}"
