"""jobs/slurm.py through submitit's real SlurmExecutor on a real one-node SLURM (munged, slurmctld,
slurmd started by cluster/slurm-local.sh): a job runs to its end, `scontrol requeue` of a running
job (a preemption) resumes it from its newest complete checkpoint, and `scancel` leaves none of
the job's Ray processes behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, load_job, tiny_overrides
from tests.ports import ATTEMPTS, free_ports, owners, patience
from tests.test_cluster import port_is_free, steps

slurm = load_job("slurm")
SCRIPT = ROOT / "cluster" / "slurm-local.sh"
NEEDED = ("munged", "mungekey", "munge", "slurmctld", "slurmd", "sinfo", "sbatch", "srun",
          "scontrol", "scancel", "squeue")  # fmt: skip
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Path]:
    """munged + slurmctld + slurmd in a scratch folder, the node idle in `sinfo`; SLURM_CONF is
    exported for this module's clients (sbatch, scontrol) and the jobs; all stopped at the end."""
    missing = [name for name in NEEDED if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"no SLURM here ({', '.join(missing)} not found): install Debian's slurm-wlm and "
            "munge (`apt-get install -y slurm-wlm munge`, as .ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("a local slurmd and munged need root")
    previous = os.environ.get("SLURM_CONF")
    scratch = start_slurm()
    try:
        os.environ["SLURM_CONF"] = str(scratch / "slurm.conf")
        yield scratch
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stopped, alive = stop_slurm(scratch)
        assert stopped.returncode == 0 and not alive, (alive, stopped.stderr)


def start_slurm() -> Path:
    """cluster/slurm-local.sh on two free ports, up once `sinfo` shows the node idle and
    slurmctld and slurmd (by their pid files) listen on the ports they were given; started
    again in a fresh folder on new ports if not (``tests.ports``: a port taken meanwhile)."""
    problems = []
    for _ in range(ATTEMPTS):
        scratch = Path(tempfile.mkdtemp(prefix="distsr-slurm-"))  # not under pytest's 0700
        ports = free_ports(2)  # folders: the munge user must reach its socket inside
        env = {**os.environ, "SLURMCTLD_PORT": str(ports[0]), "SLURMD_PORT": str(ports[1]),
               "START_TIMEOUT_S": str(int(patience(120)))}  # fmt: skip
        started = subprocess.run(["bash", str(SCRIPT), "start", str(scratch)], env=env,
                                 capture_output=True, text=True, timeout=patience(300))  # fmt: skip
        if started.returncode == 0:
            pids = [int((scratch / f"{d}.pid").read_text()) for d in ("slurmctld", "slurmd")]
            state = {port: owners([pid], [port])[port] for pid, port in zip(pids, ports)}
            if all(who == "ours" for who in state.values()):
                return scratch
            problems.append(f"slurmctld/slurmd ports {state}")
        else:
            problems.append(f"ports {ports}: {(started.stdout + started.stderr)[-2000:]}")
        stop_slurm(scratch)
    raise RuntimeError(f"no local SLURM after {ATTEMPTS} starts: {' | '.join(problems)}")


def stop_slurm(scratch: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Stop the daemons, remove the folder; (the stop's result, daemons still alive)."""
    stopped = subprocess.run(["bash", str(SCRIPT), "stop", str(scratch)],
                             capture_output=True, text=True, timeout=patience(300))  # fmt: skip
    daemons = [scratch / "slurmd.pid", scratch / "slurmctld.pid", scratch / "munge/munged.pid"]
    alive = [p.name for p in daemons if p.is_file() and pid_alive(int(p.read_text()))]
    shutil.rmtree(scratch, ignore_errors=True)
    return stopped, alive


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...): without accounting storage
    sacct knows nothing, and SLURM keeps a finished job here for MinJobAge (300 s)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True, timeout=patience(60)).stdout  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, what: str, ready: Callable[[dict], bool], timeout: float) -> dict:
    """Poll the job until ``ready(info)``; fails at once if it ends without being ready."""
    seen: dict[str, str] = {}

    def check() -> bool:
        seen.update(job_info(job_id))
        if ready(seen):
            return True
        if seen["JobState"] in TERMINAL:
            raise AssertionError(f"job {job_id} ended ({seen['JobState']}) before {what}")
        return False

    slurm.wait_until(check, f"job {job_id}: {what}", timeout)
    return seen


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("step_*/COMPLETE"))


def ray_processes(token: Path) -> dict[int, str]:
    """The processes of one job's private Ray cluster (and its driver), whatever they are
    called: every one of them inherits RAY_AUTH_TOKEN_PATH naming that job's own token file."""
    needle = f"RAY_AUTH_TOKEN_PATH={token}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(proc.name)] = cmd.strip()[:120]
        except OSError:  # exited meanwhile
            continue
    return found


def submit(tmp_path: Path, shards: Path, name: str, max_steps: int):
    overrides = tiny_overrides(
        tmp_path, shards, f"name={name}", f"engine.max_steps={max_steps}", "engine.log_every=1",
        "engine.checkpoint.every_steps=2", "scaling.num_workers=1",
    )  # fmt: skip
    job = slurm.submit(["resshift_tiny", "--cpus-per-task", "2", "--time", "30",
                        "--folder", str(tmp_path / "submitit"), "--", *overrides])  # fmt: skip
    assert isinstance(job, slurm.submitit.SlurmJob)
    return job, tmp_path / name, job.submission().function.token


def assert_no_ray_left(job, token: Path) -> None:
    stray = ray_processes(token)
    assert not stray, f"job {job.job_id} left Ray processes behind: {stray}"
    gcs = slurm.RayPorts.for_job(job.job_id).gcs
    assert port_is_free(gcs)
    latest = slurm.latest_cluster_file()
    assert not latest.exists() or not latest.read_text().strip().endswith(f":{gcs}")


def cancel(job) -> None:
    if job_info(job.job_id).get("JobState") not in TERMINAL:
        job.cancel(check=False)


def test_job_runs_to_its_end(slurm_cluster, tiny_shards, tmp_path):
    job, run_dir, token = submit(tmp_path, tiny_shards, "done", max_steps=4)
    try:
        info = wait_for_job(job.job_id, "completed", lambda i: i["JobState"] == "COMPLETED",
                            patience(400))  # fmt: skip
    finally:
        cancel(job)
    out = job.stdout()
    assert job.result() == 0, out[-4000:]  # submitit's own result of the real job
    assert info["Restarts"] == "0" and "(1 node(s))" in out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4 and status["restarts"] == 0
    assert steps(run_dir) == [1, 2, 3, 4]
    assert (run_dir / "export" / "unet.safetensors").stat().st_size > 0
    assert_no_ray_left(job, token)


def test_requeued_job_resumes_from_its_newest_complete_checkpoint(
    slurm_cluster, tiny_shards, tmp_path
):
    job, run_dir, token = submit(tmp_path, tiny_shards, "requeued", max_steps=12)
    try:
        wait_for_job(job.job_id, "a complete checkpoint",
                     lambda i: bool(complete_checkpoints(run_dir)), patience(400))  # fmt: skip
        newest = complete_checkpoints(run_dir)[-1]
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=patience(60))
        info = wait_for_job(job.job_id, "completed after a restart",
                            lambda i: i["JobState"] == "COMPLETED", patience(500))  # fmt: skip
    finally:
        cancel(job)
    out = job.stdout()
    assert info["Restarts"] == "1" and "DUE TO JOB REQUEUE" in out, out[-4000:]
    assert job.result() == 0, out[-4000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    assert len(resumed) == 1, out[-4000:]
    folder, step = Path(resumed[0][0]), int(resumed[0][1])
    # the newest checkpoint marked complete when the job was requeued, or a newer one the dying
    # job completed; the relaunch prunes it once `keep` newer ones are complete, so its marker
    # is not looked for now (tests/test_engine_units.py pins that only marked folders are taken)
    assert step >= newest and step % 2 == 0 and folder.parent == run_dir
    assert complete_checkpoints(run_dir) == [10, 12]  # keep: 2, nothing older left over
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 12
    assert status["starts"] == 2 and status["restarts"] == 1
    logged = steps(run_dir)  # steps after the checkpoint ran twice; none is missing
    assert logged[-1] == 12 and logged.count(12) == 1 and sorted(set(logged)) == list(range(1, 13))
    assert (run_dir / "export" / "unet.safetensors").is_file()
    assert_no_ray_left(job, token)


def test_scancel_leaves_no_ray_processes(slurm_cluster, tiny_shards, tmp_path):
    job, run_dir, token = submit(tmp_path, tiny_shards, "cancelled", max_steps=500)
    try:
        wait_for_job(job.job_id, "a complete checkpoint",
                     lambda i: bool(complete_checkpoints(run_dir)), patience(400))  # fmt: skip
        running = ray_processes(token)
        kinds = " ".join(running.values())
        assert "gcs_server" in kinds and "raylet" in kinds and "RayTrainWorker" in kinds, running
        subprocess.run(["scancel", job.job_id], check=True, timeout=patience(60))
        wait_for_job(job.job_id, "cancelled", lambda i: i["JobState"] == "CANCELLED",
                     patience(120))  # fmt: skip
        # SLURM ends the job once its tracked processes are gone (KillWait 10 s); an escaped
        # one stays
        slurm.wait_until(lambda: not set(running) & set(ray_processes(token)),
                         f"job {job.job_id}'s Ray processes to exit", patience(60))  # fmt: skip
    finally:
        cancel(job)
    assert_no_ray_left(job, token)
    assert json.loads((run_dir / "status.json").read_text())["state"] != "finished"
