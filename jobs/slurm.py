"""Submit a distsr job to SLURM through submitit, on a private Ray cluster per job.

    python jobs/slurm.py tadsr_resshift --nodes 2 --gpus-per-node 8 --partition gpu \\
        --time 24:00:00 -- output_dir=/shared/runs
    python jobs/slurm.py resshift_tiny --local -- data.shards=[shards/tiny]   # same code, here
    python jobs/slurm.py CONFIG --job jobs/cache_teacher.py -- key=value ...  # any other job

Node 0 starts a Ray head (`ray start --head --block`, ports derived from the SLURM job id so two
jobs on one node do not collide, token authentication with a token file private to the job); the
other nodes join it. The job itself (`python -m distsr.launch CONFIG ARGS`, or `python JOB CONFIG
ARGS`) runs as a child process with RAY_ADDRESS set. On preemption or timeout submitit calls
`checkpoint()`: the child and Ray stop, and the job is requeued with the same arguments, so the
training resumes from the run folder through Ray Train's checkpoint (same name and output_dir).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

PORT_BASE, PORT_SLOTS, PORTS_PER_SLOT = 10000, 137, 160  # all below the ephemeral range
WORKER_PORT_OFFSET = 10
LOG = "[distsr.slurm]"
PR_SET_PDEATHSIG = 1
HEAD_TIMEOUT_S, JOIN_TIMEOUT_S = 180.0, 900.0
# a head stopped by SIGTERM tears down at once (Ray's default drains the node for up to 30 s)
HEAD_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class RayPorts:
    """Every port a Ray node opens, in one block chosen by the job id."""

    def __init__(self, base: int):
        self.base = base

    @classmethod
    def for_job(cls, job_id: str) -> RayPorts:
        digits = re.sub(r"\D", "", job_id)
        key = int(digits) if digits else zlib.crc32(job_id.encode())
        return cls(PORT_BASE + (key % PORT_SLOTS) * PORTS_PER_SLOT)

    @property
    def gcs(self) -> int:
        return self.base

    @property
    def agent(self) -> int:
        """The node's dashboard agent (HTTP): health check and job agent."""
        return self.base + 5

    def node_flags(self) -> list[str]:
        b = self.base
        return [
            f"--node-manager-port={b + 3}", f"--object-manager-port={b + 4}",
            f"--dashboard-agent-listen-port={self.agent}", f"--dashboard-agent-grpc-port={b + 6}",
            f"--runtime-env-agent-port={b + 7}", f"--metrics-export-port={b + 8}",
            f"--min-worker-port={b + WORKER_PORT_OFFSET}",
            f"--max-worker-port={b + PORTS_PER_SLOT - 1}",
        ]  # fmt: skip

    def head_flags(self) -> list[str]:
        b = self.base
        return [f"--port={b}", f"--dashboard-port={b + 1}", f"--ray-client-server-port={b + 2}"]


def parse_minutes(text: str) -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + b * 60 + c
    elif m.group(4) is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + b
    return max(1, -(-seconds // 60))


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def ray_env(token_path: Path, **extra: str) -> dict[str, str]:
    """Environment for every process of the private cluster: Ray 2.60 token authentication."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), **extra)
    return env


def write_token(path: Path) -> Path:
    """A fresh token, readable by the owner only (the folder must be shared by all nodes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _child_setup() -> None:
    # SLURM signals every process of the step; only the submitit task may react to it
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
    with contextlib.suppress(AttributeError, OSError):  # Linux: if the task dies, SIGTERM them
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(cmd: list[str], env: dict, log: Path | None = None, cwd: str | None = None):
    out = open(log, "a") if log else None  # noqa: SIM115 (the child owns it)
    try:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, preexec_fn=_child_setup,
        )  # fmt: skip
    finally:
        if out:
            out.close()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies left to an init that does not
    reap them do not count). Linux /proc; elsewhere only the leader is waited for."""
    if not os.path.isdir("/proc"):
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def stop(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns once every process
    of the group has exited (a Ray node's gcs_server and raylet outlive ``ray start``)."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: proc.poll() is not None and not _group_alive(proc.pid),
                       f"process group {proc.pid} to exit", wait)  # fmt: skip
            return


def wait_until(ready: Callable[[], bool], what: str, timeout: float,
               proc: subprocess.Popen | None = None, interval: float = 0.5) -> None:  # fmt: skip
    """Poll ``ready()`` until it is true; RuntimeError after ``timeout`` s or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def agent_healthy(ip: str, agent_port: int) -> bool:
    """The node's dashboard agent answers ``/api/healthz``: its HTTP server (with the job agent
    that ``ray job submit`` needs) is up, and the GCS is alive and sees this node's raylet
    alive. KubeRay's readiness probe asks the same. The port opening alone says none of this."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{agent_port}/api/healthz", timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def auth_headers(token_path: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"}


def job_api_answers(url: str, token_path: Path) -> bool:
    """The dashboard's job API lists jobs (its job module is up and accepts our token)."""
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(url, headers=auth_headers(token_path)).list_jobs()
        return True
    except (OSError, RuntimeError):  # connection refused / not ready (HTTP 5xx)
        return False


def wait_for_head(head: subprocess.Popen, ip: str, agent_port: int, timeout: float,
                  jobs_url: str | None = None, token_path: Path | None = None) -> None:  # fmt: skip
    """Wait until a Ray head can run drivers (GCS and raylet alive) and, with ``jobs_url``,
    accept ``ray job submit``: its job API answers and the job agent it submits through is up
    (the job API alone answers from the GCS before that agent registers; a submission then
    fails with "No available agent to submit job")."""
    agent = f"the Ray head's agent at {ip}:{agent_port} to report healthy"
    wait_until(lambda: agent_healthy(ip, agent_port), agent, timeout, head)
    if jobs_url is not None:
        api = f"the Ray job API at {jobs_url}"
        wait_until(lambda: job_api_answers(jobs_url, token_path), api, timeout, head)


def latest_cluster_file() -> Path:
    """The machine's "latest cluster" file: `ray start` writes it, `ray stop` removes it."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def forget_cluster(gcs_port: int) -> None:
    """Drop the latest-cluster file if it names the (stopped) cluster at ``gcs_port``, as
    ``ray stop`` does for the clusters it stops; we stop ours by signal, for ``ray stop`` would
    stop every cluster here. A stale file makes Ray processes with no RAY_ADDRESS (Ray Train's
    PlacementGroupCleaner in a later local run) poll a dead address."""
    path = latest_cluster_file()
    with contextlib.suppress(OSError):
        if path.read_text().strip().rsplit(":", 1)[-1] == str(gcs_port):
            path.unlink()


def node_ip(local: bool) -> str:
    if local:
        return "127.0.0.1"
    from ray.util import get_node_ip_address

    return get_node_ip_address()


class RayClusterJob(Checkpointable):
    """A submitit task per node: node 0 runs the Ray head and the job, the others join."""

    def __init__(self, command: list[str], cwd: str, folder: Path, token: Path, gpus: int,
                 cpus: int | None, local: bool):  # fmt: skip
        self.command, self.cwd, self.folder, self.token = command, cwd, folder, token
        self.gpus, self.cpus, self.local = gpus, cpus, local
        self._head = self._child = self._head_file = self._gcs_port = None

    def __getstate__(self) -> dict:  # processes stay behind when pickled for the requeue
        return {**self.__dict__, "_head": None, "_child": None, "_head_file": None,
                "_gcs_port": None}  # fmt: skip

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        ports = RayPorts.for_job(env.job_id)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        head_file = self.folder / f"{env.job_id}_{restart}_ray_head"
        try:
            if env.node > 0:
                return self.join(head_file, ports)
            return self.lead(env, head_file, ports)
        finally:
            self.shutdown()

    def ray_start(self, ports: RayPorts, *flags: str) -> list[str]:
        cpus = os.environ.get("SLURM_CPUS_PER_TASK") or self.cpus or os.cpu_count()
        return [ray_executable(), "start", "--block", "--disable-usage-stats", *flags,
                *ports.node_flags(), f"--num-cpus={cpus}", f"--num-gpus={self.gpus}"]  # fmt: skip

    def lead(self, env, head_file: Path, ports: RayPorts) -> int:
        ip = node_ip(self.local)
        address = f"{ip}:{ports.gcs}"  # RAY_ADDRESS for Ray's own processes too (no "auto")
        cmd = self.ray_start(ports, "--head", f"--node-ip-address={ip}", *ports.head_flags())
        head_env = ray_env(self.token, RAY_ADDRESS=address, **HEAD_ENV)
        self._gcs_port = ports.gcs
        self._head = spawn(cmd, head_env, log=self.folder / f"{env.job_id}_ray_head.log")
        wait_for_head(self._head, ip, ports.agent, HEAD_TIMEOUT_S)
        tmp = head_file.with_name(head_file.name + ".tmp")
        tmp.write_text(address)
        tmp.replace(head_file)
        self._head_file = head_file
        print(f"{LOG} job {env.job_id} (task pid {os.getpid()}): Ray head at {address} "
              f"({env.num_nodes} node(s)); running {shlex.join(self.command)}",
              flush=True)  # fmt: skip
        child_env = ray_env(self.token, RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
        self._child = spawn(self.command, child_env, cwd=self.cwd)
        while (code := self._child.poll()) is None:  # polled, not wait(): see checkpoint()
            time.sleep(0.5)
        if code != 0:
            raise RuntimeError(f"{shlex.join(self.command)} exited with {code}")
        print(f"{LOG} job {env.job_id}: finished", flush=True)
        return code

    def join(self, head_file: Path, ports: RayPorts) -> int:
        # node 0 writes the file once its head is ready
        wait_until(head_file.exists, f"a Ray head announced in {head_file}", JOIN_TIMEOUT_S,
                   interval=2)  # fmt: skip
        address = head_file.read_text().strip()
        cmd = self.ray_start(ports, f"--address={address}")
        self._gcs_port = ports.gcs
        self._head = spawn(cmd, ray_env(self.token, RAY_ADDRESS=address))
        while self._head.poll() is None:  # until the head goes away
            time.sleep(1)
        return 0

    def shutdown(self) -> None:
        stop(self._child, grace=30)
        stop(self._head, grace=60)
        if self._head_file is not None:
            self._head_file.unlink(missing_ok=True)
        if self._gcs_port is not None:
            forget_cluster(self._gcs_port)
        self._head = self._child = self._head_file = self._gcs_port = None

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit's preemption/timeout signal handler on node 0; requeues.

        The job resumes from its run folder (Ray Train checkpoint), so the same arguments are
        resubmitted. ``__call__`` polls its child, so stopping it here never deadlocks on
        ``Popen.wait``'s lock.
        """
        print(f"{LOG} preempted or timed out: stopping the job and Ray, requeueing", flush=True)
        self.shutdown()
        return DelayedSubmission(self, *args, **kwargs)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    job_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python jobs/slurm.py", description=__doc__.split("\n")[0])
    p.add_argument("config", help="first argument of the job: a config name or YAML path")
    p.add_argument("--job", help="a job script (e.g. jobs/cache_teacher.py); default: training")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (default: 8, --local: all)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="24:00:00", help="minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--max-requeues", type=int, default=3, help="timeouts tolerated")
    p.add_argument("--folder", default="runs/slurm", help="submitit logs, shared by all nodes")
    p.add_argument("--local", action="store_true", help="submitit's local executor, this machine")
    p.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    return p.parse_args(argv), job_args


def job_command(args: argparse.Namespace, job_args: list[str]) -> list[str]:
    """The child's command line; the training config is checked before anything is queued."""
    if args.job is None:
        from distsr.runconfig import load_run_config

        load_run_config(args.config, job_args)
        return [sys.executable, "-m", "distsr.launch", args.config, *job_args]
    script = Path(args.job).resolve()
    if not script.is_file():
        raise ValueError(f"--job {args.job}: no such file")
    return [sys.executable, str(script), args.config, *job_args]


def check(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.cpus_per_task or 1) < 1:
        raise ValueError("--nodes must be >= 1, --gpus-per-node >= 0, --cpus-per-task >= 1")
    if args.local and args.nodes != 1:
        raise ValueError("--local runs on this machine only: use --nodes 1")


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    cluster = "local" if args.local else "slurm"
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                   **{f"{cluster}_max_num_timeout": args.max_requeues})  # fmt: skip
    except RuntimeError as err:  # no srun on this machine
        raise ValueError(f"{err} (use --local to run on this machine)") from err
    ex.update_parameters(
        name=f"distsr-{Path(args.config).stem}", timeout_min=parse_minutes(args.time),
        nodes=args.nodes, tasks_per_node=1, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or (None if args.local else 8), stderr_to_stdout=True,
        slurm_partition=args.partition, slurm_account=args.account,
    )  # fmt: skip
    return ex


def submit(argv: list[str]):
    """Parse ``argv`` and submit; returns the submitit Job (None with --dry-run)."""
    args, job_args = parse_args(argv)
    check(args)
    command = job_command(args, job_args)
    folder = Path(args.folder).resolve()
    if args.dry_run:
        print(f"{LOG} would run on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), "
              f"{'locally' if args.local else 'on SLURM'}: {shlex.join(command)}")  # fmt: skip
        return None
    executor = make_executor(args, folder)
    token = write_token(folder / f"ray_token_{secrets.token_hex(4)}")
    job = executor.submit(RayClusterJob(command, os.getcwd(), folder, token, args.gpus_per_node,
                                        args.cpus_per_task, args.local))  # fmt: skip
    print(f"{LOG} submitted job {job.job_id}; log: {job.paths.stdout}", flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    try:
        job = submit(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(job, submitit.LocalJob):  # --local: stay with the job, a child of this process
        try:
            job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError):
            print(f"error: job {job.job_id} failed; see {job.paths.stdout}", file=sys.stderr)
            return 1
        print(f"{LOG} job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
