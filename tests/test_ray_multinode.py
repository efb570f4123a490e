"""Two Ray nodes on loopback: a `ray start --head` and a second raylet joined with `ray start
--address`, each with one CPU and its own custom resource (``node_a`` / ``node_b``). A 2-worker
training run must place one worker per node (one CPU each, so nothing else fits), each rank reads
its own shards, and when the second node's raylet is killed mid-run the run restarts (Ray Train
``max_failures``) from the newest complete checkpoint and loses nothing.

The restart needs two workers' worth of CPUs again, so a replacement raylet (same resources) is
started once the state API reports the killed node dead, as an autoscaler or a Kubernetes
operator would replace a lost node; Ray Train waits for it (its placement group stays pending).
The GCS keeps Ray's default health check (5 missed checks 3 s apart): a tighter one declares a
live raylet of a loaded 2-core machine dead. The test waits on the state API instead, with a
deadline (``tests.ports.patience``).

What each rank read is recorded where it was read: the shards are opened through WebDataset
``pipe:`` urls, small scripts that append ``RANK RAY_RAYLET_PID shard`` to a log and stream the
tar. ``RAY_RAYLET_PID`` (set by Ray in every worker) names the node the reading worker ran on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import webdataset as wds

from tests.conftest import ROOT, load_job, tiny_overrides
from tests.ports import patience, start_on_free_ports
from tests.test_cluster import RAY, stop_node

pytestmark = pytest.mark.slow
slurm = load_job("slurm")
IP = "127.0.0.1"
SHARDS, PER_SHARD = 8, 4  # a pass: 4 shard reads (16 samples, 4 steps) per rank
MAX_STEPS, EVERY = 30, 5


def write_recorded_shards(tiny_shards: Path, folder: Path, log: Path) -> list[str]:
    """``SHARDS`` shards of ``PER_SHARD`` real samples each, and a ``pipe:`` url per shard that
    records who opened it in ``log`` before streaming it."""
    folder.mkdir()
    samples = wds.tarfile_samples([{"url": str(p)} for p in sorted(tiny_shards.glob("*.tar"))])
    urls = []
    for i in range(SHARDS):
        tar = folder / f"part-{i}.tar"
        with wds.TarWriter(str(tar)) as sink:
            for _ in range(PER_SHARD):
                s = next(samples)
                sink.write({k: v for k, v in s.items() if k == "__key__" or "." in k})
        script = folder / f"read-{i}.sh"
        script.write_text(f'#!/bin/sh\necho "$RANK $RAY_RAYLET_PID part-{i}" >> {log}\n'
                          f"exec cat {tar}\n")  # fmt: skip
        script.chmod(0o755)
        urls.append(f"pipe:{script}")
    return urls


def reads(log: Path) -> list[tuple[int, int, str]]:
    """``(rank, raylet pid, shard)`` per shard opened, in order."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(r), int(p), s) for r, p, s in (line.split() for line in lines)]


def group_pid(pgid: int, name: str) -> int | None:
    """The process called ``name`` in process group ``pgid`` (a node's raylet)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            if comm == name and int(text.rsplit(")", 1)[1].split()[2]) == pgid:
                return int(stat.parent.name)
    return None


class Cluster:
    """The head and the joined nodes; each node's processes are its own process group."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.token = slurm.write_token(tmp_path / "ray_token")
        self.nodes: list[subprocess.Popen] = []
        self.head, ports = start_on_free_ports(
            4, self.start_head, self.agent_healthy, stop_node, "the Ray head", patience(300)
        )
        self.gcs, self.dashboard = ports[:2]
        self.address = f"{IP}:{self.gcs}"
        self.env = self.ray_env(self.gcs)

    def ray_env(self, gcs: int) -> dict:
        return slurm.ray_env(self.token, RAY_ADDRESS=f"{IP}:{gcs}")

    def start_head(self, ports: list[int]) -> subprocess.Popen:
        gcs, dashboard, client, agent = ports  # the agent last, as a joined node's only port
        cmd = [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={client}", *self.node_flags(agent, "node_a")]  # fmt: skip
        env = {**self.ray_env(gcs), **slurm.HEAD_ENV}
        return slurm.spawn(cmd, env, log=self.tmp / "ray_head.log")

    @staticmethod
    def agent_healthy(ports: list[int]) -> bool:
        """The node's agent (its last port) answers healthy: the GCS sees its raylet alive."""
        return slurm.agent_healthy(IP, ports[-1])

    @staticmethod
    def node_flags(agent: int, resource: str) -> list[str]:
        # random worker ports: two raylets on one machine must not share Ray's default range
        return ["--block", "--num-cpus=1", f"--resources={json.dumps({resource: 1})}",
                f"--node-ip-address={IP}", f"--dashboard-agent-listen-port={agent}",
                "--min-worker-port=0", "--max-worker-port=0",
                "--disable-usage-stats"]  # fmt: skip

    def join(self, resource: str) -> subprocess.Popen:
        """A second raylet; returns once its agent reports it healthy (the GCS sees it alive)."""
        log = self.tmp / f"ray_{resource}_{len(self.nodes)}.log"

        def start(ports: list[int]) -> subprocess.Popen:
            cmd = [RAY, "start", f"--address={self.address}", *self.node_flags(ports[0], resource)]
            return slurm.spawn(cmd, self.env, log=log)

        def stop(node: subprocess.Popen, _ports) -> None:
            slurm.stop(node, grace=patience(60))

        node, _ = start_on_free_ports(1, start, self.agent_healthy, stop, f"{resource} to join",
                                      patience(300))  # fmt: skip
        self.nodes.append(node)
        return node

    def state(self, what: str) -> list[dict]:
        """Ray's state API (``/api/v0/nodes``, ``/api/v0/actors``) on the head's dashboard."""
        request = urllib.request.Request(f"http://{IP}:{self.dashboard}/api/v0/{what}?limit=1000",
                                         headers=slurm.auth_headers(self.token))  # fmt: skip
        with urllib.request.urlopen(request, timeout=patience(30)) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, str]:
        """Custom resource -> node id of every node the GCS holds alive."""
        alive = [n for n in self.state("nodes") if n["state"] == "ALIVE"]
        return {r: n["node_id"] for n in alive for r in n["resources_total"] if "node_" in r}

    def stop(self) -> None:
        for proc in self.nodes:
            slurm.stop(proc, grace=patience(60))
        stop_node(self.head, [self.gcs])


@contextlib.contextmanager
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        cluster.join("node_b")
        slurm.wait_until(lambda: set(cluster.alive_nodes()) == {"node_a", "node_b"},
                         "both nodes alive in the state API", patience(120))  # fmt: skip
        yield cluster
    finally:
        cluster.stop()


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def complete(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("step_*/COMPLETE"))


def test_one_worker_per_node_and_a_lost_node_is_survived(tiny_shards, tmp_path):
    started = time.monotonic()
    log = tmp_path / "reads.log"
    urls = write_recorded_shards(tiny_shards, tmp_path / "shards", log)
    run_dir = tmp_path / "multinode"
    overrides = tiny_overrides(
        tmp_path, ", ".join(urls), "name=multinode", f"engine.max_steps={MAX_STEPS}",
        "engine.log_every=1", f"engine.checkpoint.every_steps={EVERY}", "engine.preview_every=0",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.max_failures=1",
        "data.shuffle=8",
    )  # fmt: skip
    cmd = [sys.executable, "-m", "distsr.launch", "resshift_tiny", *overrides]
    with two_nodes(tmp_path) as cluster:
        nodes = cluster.alive_nodes()
        raylet_a = group_pid(cluster.head.pid, "raylet")
        raylet_b = group_pid(cluster.nodes[0].pid, "raylet")
        assert raylet_a and raylet_b and raylet_a != raylet_b
        env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
        out_path = tmp_path / "launch.log"
        with open(out_path, "w") as out:
            driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
        try:
            slurm.wait_until(lambda: metrics(run_dir), "the first step", patience(600), driver)
            workers = [
                a["node_id"]
                for a in cluster.state("actors")
                if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"
            ]
            slurm.wait_until(lambda: complete(run_dir), "the first complete checkpoint",
                             patience(600), driver, interval=0.1)  # fmt: skip
            first_complete = complete(run_dir)[-1]
            os.kill(raylet_b, signal.SIGKILL)  # the second node is lost
            before = reads(log)  # the first attempt's reads
            killed_at = time.monotonic()
            # Ray's default: 5 missed health checks 3 s apart, then the node is dead
            slurm.wait_until(lambda: "node_b" not in cluster.alive_nodes(),
                             "the killed node to be declared dead", patience(120),
                             driver)  # fmt: skip
            detected = time.monotonic() - killed_at
            cluster.join("node_b")  # its replacement
            raylet_b2 = group_pid(cluster.nodes[1].pid, "raylet")
            driver.wait(timeout=patience(600))
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
        text = out_path.read_text()
    assert driver.returncode == 0, text[-4000:]
    print(f"two-node run: {time.monotonic() - started:.0f} s, node loss seen by the GCS after "
          f"{detected:.1f} s")  # fmt: skip

    # one worker per node: the two live Ray Train workers ran on node_a's and node_b's ids
    assert sorted(workers) == sorted([nodes["node_a"], nodes["node_b"]])
    # ... and, from the reads, each rank read on one of the two raylets, a different one each
    placed = [{p for r, p, _ in before if r == rank} for rank in (0, 1)]
    assert placed in ([{raylet_a}, {raylet_b}], [{raylet_b}, {raylet_a}]), before
    # each rank reads its own shards: in every pass (before the loss) the two ranks' 4 reads
    # are disjoint and together cover the 8 shards once
    ranks = [[s for r, _, s in before if r == rank] for rank in (0, 1)]
    assert min(len(ranks[0]), len(ranks[1])) >= 4, ranks
    for k in range(0, min(len(ranks[0]), len(ranks[1])) // 4 * 4, 4):
        first, second = set(ranks[0][k : k + 4]), set(ranks[1][k : k + 4])
        assert len(first) == len(second) == 4 and not first & second, ranks
        assert first | second == {f"part-{i}" for i in range(SHARDS)}
    # after the restart one rank read on the replacement node, the other on the head
    after = reads(log)[len(before) :]
    (moved,) = {r for r, p, _ in after if p == raylet_b2} or {None}
    assert moved is not None and (1 - moved, raylet_a) in {(r, p) for r, p, _ in after}, after

    # restarted once, from the newest checkpoint complete when the node was lost; nothing lost
    resumed = set(re.findall(r"resumed from (\S+) at step (\d+)", text))  # each line twice:
    assert len(resumed) == 1, text[-4000:]  # both nodes' log monitors tail the session's logs
    folder, step = Path(next(iter(resumed))[0]), int(next(iter(resumed))[1])
    steps = [m["step"] for m in metrics(run_dir)]
    # the last step before the loss (the killed worker runs on until Ray's process watcher sees
    # its raylet gone: a few steps, maybe a checkpoint) is logged again unless it was resumed
    reached = next((a for a, b in zip(steps, steps[1:], strict=False) if b <= a), step)
    # the checkpoint of step s completed before step s + 1 ran (all ranks' barrier)
    assert folder.name == f"step_{step:08d}" and step >= first_complete
    assert (reached - 1) // EVERY * EVERY <= step <= reached and step % EVERY == 0, steps
    assert steps == [*range(1, reached + 1), *range(step + 1, MAX_STEPS + 1)], steps
    status = json.loads((run_dir / "status.json").read_text())
    assert status["restarts"] == 1 and status["state"] == "finished", status
    final = torch.load(run_dir / f"step_{MAX_STEPS:08d}" / "client_state.pt", weights_only=False)
    assert final["step"] == MAX_STEPS
    assert final["samples_seen"] == MAX_STEPS * 4 * 2  # batch 4, 2 ranks
    assert [d["batches"] for d in final["data"]] == [MAX_STEPS, MAX_STEPS]  # stream positions
    assert (run_dir / f"step_{MAX_STEPS:08d}" / "COMPLETE").exists()
