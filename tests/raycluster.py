"""Two Ray nodes on loopback for the multi-node tests (tests/test_ray_elastic.py,
tests/test_ray_head_loss.py): a `ray start --head` and raylets joined with `ray start --address`,
each with one CPU and its own custom resource (``node_a`` / ``node_b``), so a worker per node is
all that fits. The GCS keeps Ray's default health check (5 missed checks 3 s apart): a tighter
one declares a live raylet of a loaded 2-core machine dead. Readiness is the node agent's
health endpoint and the state API, each with a deadline (``tests.ports.patience``).

What each rank read is recorded where it was read: ``write_recorded_shards`` opens the shards
through WebDataset ``pipe:`` urls, small scripts that append ``RANK RAY_RAYLET_PID shard`` to a
log and stream the tar. ``RAY_RAYLET_PID`` (set by Ray in every worker) names the node the
reading worker ran on."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from tests.conftest import load_job
from tests.ports import patience, start_on_free_ports
from tests.test_cluster import RAY, stop_node

slurm = load_job("slurm")
IP = "127.0.0.1"
SHARDS, PER_SHARD = 8, 4  # a pass: 4 shard reads (16 samples, 4 steps) per rank at batch 4


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
