"""README.md's command blocks, run as written with bash in a fresh copy of the project, in the
session's home after the demo ran there (``demo_run``, tests/conftest.py): the laptop path of
tadsr_seesr_tiny (``ray start --head``, two ``ray job submit``, upscale, export, evaluate) and
the ResShift stages one by one (shards, teacher, cache, student, evaluate, upscale).

The home holds ``~/.ray/auth_token``, as it does for anyone who has used Ray here (``ray.init()``
writes it): a plain ``ray start --head`` then turns token authentication on, and a ``ray job
submit`` that sends no token fails. What the test fills in, as a user would, and nothing else:
``<fingerprint ...>`` from the previous command's output; INPUT, OUTPUT and HR_FOLDER. What it
adds because other Ray clusters run on this machine: free ports and a temp dir of its own for
``ray start --head`` (a job's driver is pointed at the latest cluster of the temp dir, not at
the one it was submitted to), and ``RAY_API_SERVER_ADDRESS`` naming its dashboard for ``ray job
submit``. The cluster is stopped by its process session, not by ``ray stop``, which would stop
every cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.ports import ATTEMPTS, free_ports, owners, patience
from tests.test_cluster import RAY, port_is_free, slurm
from tests.test_seesr_launch import LIVE, SAMPLER, STORED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(patience(2700))]  # with the demo's setup
IP = "127.0.0.1"
FINGERPRINT = re.compile(r"\[cache\] teacher (\S+) -> ")


def command_blocks(text: str) -> list[list[str]]:
    """Markdown's indented code blocks, each as its commands (``\\`` continuations joined)."""
    blocks, current, blank_before = [], None, True
    for line in text.splitlines():
        if line.startswith("    ") and line.strip() and (current is not None or blank_before):
            if current is None:
                current = []
                blocks.append(current)
            current.append(line.strip())
        elif line.strip():
            current = None
        blank_before = not line.strip()
    return [_logical(block) for block in blocks]


def _logical(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out


def block_with(command: str) -> list[str]:
    """The one README block that has a command starting with ``command``."""
    found = [b for b in command_blocks((ROOT / "README.md").read_text())
             if any(c.startswith(command) for c in b)]  # fmt: skip
    assert len(found) == 1, f"README.md has {len(found)} blocks with `{command}`"
    return found[0]


def copy_project(dest: Path) -> Path:
    """The working tree as a fresh clone would have it plus uncommitted files (not ignored)."""
    ls = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(ls, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray's workers have process groups of their own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                pids.append(int(stat.parent.name))
    return pids


def stop_session(sid: int, grace: float = patience(60)) -> None:
    """SIGTERM every process of session ``sid``, SIGKILL after ``grace`` s; returns once gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(RuntimeError):
            slurm.wait_until(lambda: not session_pids(sid), f"session {sid} to exit", wait)
            return


class Shell:
    """A user's shell in ``cwd``: each command runs in bash (``export`` lines carry over), in a
    process session of its own; ``ray start --head`` gets free ports and its session is kept."""

    def __init__(self, cwd: Path, logs: Path, fill: dict[str, str]):
        self.cwd, self.logs, self.fill = cwd, logs, fill
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(PATH=path, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        self.exports: list[str] = []
        self.ports: dict[str, int] = {}
        self.cluster_sid: int | None = None
        self.ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths are in it
        self.last = ""

    def expand(self, command: str) -> str:
        if "<fingerprint" in command:
            printed = FINGERPRINT.findall(self.last)
            assert printed, f"no fingerprint printed before `{command}`"
            command = re.sub(r"<fingerprint[^>]*>", printed[-1], command)
        for word, value in self.fill.items():
            command = re.sub(rf"\b{word}\b", shlex.quote(value), command)
        return command

    def bash(self, command: str, timeout: float) -> tuple[int, str, int]:
        """(exit status, output, session id) of ``command`` after the exports so far."""
        script = "\n".join(["set -e", *self.exports, command])
        proc = subprocess.Popen(["bash", "-c", script], cwd=self.cwd, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_session(proc.pid, grace=10)
            out, _ = proc.communicate()
        return proc.returncode, out, proc.pid

    def run(self, command: str, timeout: float = patience(900)) -> str:
        command = self.expand(command)
        if command.startswith("ray start --head"):
            rc, out = self.start_head(command, timeout)
        else:
            rc, out, _ = self.bash(command, timeout)
        log = self.logs / f"{len(list(self.logs.iterdir())):02d}.log"
        log.write_text(f"$ {command}\n{out}")
        assert rc == 0, f"`{command}` failed ({rc}):\n{out[-4000:]}"
        if command.startswith("export "):
            self.exports.append(command)
        self.last = out
        return out

    def start_head(self, command: str, timeout: float) -> tuple[int, str]:
        """``command`` on free ports, up once its job API answers and its own processes listen
        on every port (``tests.ports``); on new ports if one was taken meanwhile."""
        for _ in range(ATTEMPTS):
            self.ports = dict(zip(("gcs", "dashboard", "agent", "client"), free_ports(4),
                                  strict=True))  # fmt: skip
            p = self.ports
            flags = [f"--port={p['gcs']}", f"--dashboard-port={p['dashboard']}",
                     f"--dashboard-agent-listen-port={p['agent']}",
                     f"--ray-client-server-port={p['client']}",
                     f"--node-ip-address={IP}", f"--temp-dir={self.ray_tmp}"]  # fmt: skip
            rc, out, self.cluster_sid = self.bash(" ".join([command, *flags]), timeout)
            if rc == 0 and self.wait_for_jobs():
                self.env["RAY_API_SERVER_ADDRESS"] = f"http://{IP}:{p['dashboard']}"
                return rc, out
            self.stop_cluster()
        return rc, out

    def wait_for_jobs(self) -> bool:
        """The job agent registers after ``ray start`` returns: wait for it and the job API;
        False if a port went to another process instead."""
        url = f"http://{IP}:{self.ports['dashboard']}"
        token = Path(self.env["HOME"]) / ".ray" / "auth_token"
        deadline = time.monotonic() + patience(300)
        while True:
            state = owners(session_pids(self.cluster_sid), self.ports.values())
            if "taken" in state.values():
                return False
            up = "free" not in state.values() and slurm.agent_healthy(IP, self.ports["agent"])
            if up and slurm.job_api_answers(url, token):
                return True
            assert time.monotonic() < deadline, f"the Ray head at {url} is not up: {state}"
            time.sleep(0.5)

    def stop_cluster(self) -> None:
        if self.cluster_sid is not None:
            stop_session(self.cluster_sid)
            assert port_is_free(self.ports["gcs"])
            self.cluster_sid = None


@contextlib.contextmanager
def user_shell(tmp_path: Path, fill: dict[str, str]) -> Iterator[Shell]:
    logs = tmp_path / "logs"
    logs.mkdir()
    shell = Shell(copy_project(tmp_path / "distsr"), logs, fill)
    try:
        yield shell
    finally:
        shell.stop_cluster()
        shutil.rmtree(shell.ray_tmp, ignore_errors=True)


def upscaled_x4(inputs: Path, outputs: Path) -> None:
    for src in sorted(inputs.glob("*.png")):
        with Image.open(src) as lq, Image.open(outputs / src.name) as sr:
            assert sr.size == (lq.width * 4, lq.height * 4), src.name


def test_readme_commands_run_as_written_after_the_demo(demo_run, tmp_path):
    assert demo_run.returncode == 0, demo_run.log[-4000:]
    held_out = demo_run.out / "eval_hr"  # photos a user has: the demo's held-out crops
    token = Path.home() / ".ray" / "auth_token"
    planted = not token.exists()
    fill = {"INPUT": str(held_out), "HR_FOLDER": str(held_out)}
    try:
        with user_shell(tmp_path, fill) as shell:
            if planted:  # what ray.init() leaves in the home of anyone who has used Ray
                shell.run(f"{RAY} get-auth-token --generate > /dev/null")
            work = shell.cwd
            shell.fill["OUTPUT"] = "upscaled/seesr"
            logs = [shell.run(c) for c in block_with("ray start --head")]
            shell.stop_cluster()
            submits = [log for log in logs if "Job 'raysubmit_" in log]
            assert len(submits) == 2 and all("succeeded" in log for log in submits)
            for log in submits:  # the jobs ran on the README's cluster, not a private one
                attached = re.search(r"running on the cluster at RAY_ADDRESS=(\S+):", log)
                assert attached and attached.group(1).endswith(f":{shell.ports['gcs']}"), log
            # the cache job ran RAM, the text encoder and the sampler; the 2 Ray Train workers
            # took the condition from the cache and ran none of them
            cache_log, train_log = submits
            assert LIVE in cache_log and SAMPLER in cache_log, cache_log[-4000:]
            assert STORED in train_log, train_log[-4000:]
            assert LIVE not in train_log and SAMPLER not in train_log, train_log[-4000:]
            assert (work / "runs/tadsr_seesr_tiny/step_00000004/COMPLETE").is_file()
            assert (work / "runs/tadsr_seesr_tiny/export/student.safetensors").is_file()
            upscaled_x4(held_out, work / "upscaled/seesr")
            assert (work / "exported/seesr_student/unet").is_dir()
            assert (work / "exported/seesr_student/controlnet").is_dir()
            report = (work / "eval/report.md").read_text()
            assert "| teacher | 2 |" in report and "| student | 1 |" in report

            demo = block_with("python -m distsr.launch demo")
            assert demo == [" ".join(["python", *demo_run.cmd[1:4]])]  # the run we came after
            shell.fill["OUTPUT"] = "upscaled/resshift"
            for command in block_with("python -m distsr.launch tadsr_tiny"):
                shell.run(command)
            assert (work / "runs/tadsr_tiny/export/student_ema.safetensors").is_file()
            report = (work / "eval/report.md").read_text()
            assert "| teacher | 4 |" in report and "| student | 1 |" in report
            upscaled_x4(held_out, work / "upscaled/resshift")
    finally:
        if planted:
            token.unlink(missing_ok=True)
