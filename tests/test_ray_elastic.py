"""An elastic run (``scaling.num_workers: [1, 2]``) on two Ray nodes on loopback (one raylet
each, one CPU each: ``tests/raycluster.py``), ZeRO-2 as resshift_tiny ships:

1. two workers train, one per node (from the state API and from where each rank read: the
   shards are read through recording ``pipe:`` urls), each rank its own shards;
2. node B gets a preemption notice (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, what
   the autoscaler sends when a cloud reclaims a spot node): the run checkpoints at the next step;
3. node B is killed (the reclaim): Ray Train restarts the group with the one worker node A holds,
   from that checkpoint, resharded from 2 ranks to 1 (``engine/reshard.py``), without waiting;
4. a node B joins again: within ``resize_interval_s`` the group grows back to two workers,
   resharded from 1 to 2, and the run ends at ``max_steps``.

Checked from the run's own records (``metrics.jsonl``, the launch log, the checkpoints): the
global batch is the configured one at every logged step (8 samples: batch 4 x 2 workers, or x
2 accumulated micro-batches on one); the steps run again after each restart are only those
after the checkpoint it resumed from (at most ``EVERY``; the notice's checkpoint leaves 0-1);
the final weights are near those of an uninterrupted two-worker run (bound below). The times
lost to the node loss and to the regrowth are printed (BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_overrides
from tests.ports import patience
from tests.raycluster import (
    SHARDS,
    complete,
    group_pid,
    metrics,
    reads,
    slurm,
    two_nodes,
    write_recorded_shards,
)
from tests.spawned import join_group, kill_group
from tests.test_cluster import RAY

pytestmark = pytest.mark.slow
MAX_STEPS, EVERY = 240, 10  # the one-worker part must outlast the regrowth (~30 s)
# final weights apart from the uninterrupted run's by at most this fraction of the distance
# training moved them (observed 0.36 and 0.45 in two runs: after a resize the runs see other
# samples, and SGD on 32 samples wanders). A sanity bound: it catches a run that diverged or
# stalled, not a slightly wrong reshard; test_reshard checks the reshard bit for bit
WEIGHTS_REL = 0.75
RESUMED = re.compile(r"resumed from \S+ at step (\d+) on (\d+) workers")


def overrides(shards: str, root: Path, name: str, workers: str) -> list[str]:
    return tiny_overrides(
        root, shards, f"name={name}", f"engine.max_steps={MAX_STEPS}", "data.shuffle=8",
        "engine.log_every=1", f"engine.checkpoint.every_steps={EVERY}", "engine.preview_every=0",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", "scaling.max_failures=2",
        "scaling.resize_interval_s=5", "scaling.start_timeout_s=15", "engine.checkpoint.keep=30",
    )  # fmt: skip


def launch(shards: str, tmp_path: Path, name: str, workers: str, env: dict, log: Path):
    args = overrides(shards, tmp_path, name, workers)
    cmd = [sys.executable, "-m", "distsr.launch", "resshift_tiny", *args]
    env = {**env, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def resumes(log: Path) -> list[tuple[str, str]]:
    """(step, workers) of each resume, once (both nodes' log monitors may echo a line)."""
    return list(dict.fromkeys(RESUMED.findall(log.read_text())))


def logged(run_dir: Path, key: str) -> list:
    return [m.get(key) for m in metrics(run_dir)]


def drain(cluster, node_id: str) -> None:
    subprocess.run([RAY, "drain-node", f"--address={cluster.address}", f"--node-id={node_id}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                    "--deadline-remaining-seconds=120"], env=cluster.env, check=True,
                   capture_output=True, timeout=patience(60))  # fmt: skip


def reference_rank(rank: int, port: int, root: Path, shards: str) -> None:
    """One rank of the uninterrupted two-worker run: the same loop (``train_worker``) on a gloo
    group of 2 spawned processes instead of Ray's workers (Ray adds nothing to the numbers)."""
    from distsr.engine.checkpoint import LocalStore
    from distsr.engine.context import from_environment
    from distsr.engine.loop import train_worker
    from distsr.runconfig import load_run_config

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)  # the parent's, bound
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    cfg = load_run_config("resshift_tiny", overrides(shards, root, "reference", "2"))
    train_worker(cfg, from_environment(), LocalStore(cfg.run_dir, cfg.engine.checkpoint.keep))
    dist.destroy_process_group()


@contextlib.contextmanager
def reference_run(shards: str, root: Path) -> Iterator[Path]:
    """Runs beside the elastic one (mostly waiting on Ray: the cores are free); its exported
    weights once the block ends. It reads the recorded shards' tar files directly (the same
    list in the same order). The rendezvous store is bound here (port 0) and held."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    group = mp.start_processes(reference_rank, args=(store.port, root, shards), nprocs=2,
                               join=False, start_method="spawn")  # fmt: skip
    try:
        yield root / "reference" / "export" / "unet.safetensors"
    except BaseException:
        kill_group(group)
        raise
    join_group(group, 600, "the reference run")


def initial_weights(shards: str, root: Path) -> dict:
    """What both runs start from: rank 0's freshly built network (seeded as the loop seeds it;
    DeepSpeed gives every rank rank 0's weights)."""
    from distsr.engine.loop import seed_everything
    from distsr.registry import get_recipe
    from distsr.runconfig import load_run_config

    cfg = load_run_config("resshift_tiny", overrides(shards, root, "init", "2"))
    seed_everything(cfg.seed)
    unet = get_recipe(cfg.recipe)(cfg.method, device=torch.device("cpu")).trainable()["unet"]
    return {k: v.detach().float().clone() for k, v in unet.state_dict().items()}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in b))


def assert_one_worker_per_node(workers: list, nodes: dict, before: list, raylet_a, raylet_b):
    """Two workers on two nodes: their actors ran on node A's and node B's ids, each rank read
    on one raylet, a different one each, and in every pass (4 shard reads per rank) the ranks'
    reads are disjoint and cover the shards once."""
    assert sorted(workers) == sorted([nodes["node_a"], nodes["node_b"]])
    placed = [{p for r, p, _ in before if r == rank} for rank in (0, 1)]
    assert placed in ([{raylet_a}, {raylet_b}], [{raylet_b}, {raylet_a}]), before
    ranks = [[s for r, _, s in before if r == rank] for rank in (0, 1)]
    assert min(len(ranks[0]), len(ranks[1])) >= 4, ranks
    for k in range(0, min(len(ranks[0]), len(ranks[1])) // 4 * 4, 4):
        first, second = set(ranks[0][k : k + 4]), set(ranks[1][k : k + 4])
        assert len(first) == len(second) == 4 and not first & second, ranks
        assert first | second == {f"part-{i}" for i in range(SHARDS)}


def test_a_lost_node_shrinks_the_run_and_its_return_grows_it(tiny_shards, tmp_path):
    run_dir = tmp_path / "elastic"
    log, read_log = tmp_path / "launch.log", tmp_path / "reads.log"
    urls = ", ".join(write_recorded_shards(tiny_shards, tmp_path / "shards", read_log))
    times = {}
    with reference_run(str(tmp_path / "shards"), tmp_path / "ref") as reference, \
            two_nodes(tmp_path) as cluster:  # fmt: skip
        nodes = cluster.alive_nodes()
        raylet_a = group_pid(cluster.head.pid, "raylet")
        raylet_b = group_pid(cluster.nodes[0].pid, "raylet")
        driver = launch(urls, tmp_path, "elastic", "[1,2]", cluster.env, log)
        try:
            slurm.wait_until(lambda: 2 in logged(run_dir, "world_size"), "two workers training",
                             patience(600), driver)  # fmt: skip
            workers = [a["node_id"] for a in cluster.state("actors")
                       if (a["class_name"], a["state"]) == ("RayTrainWorker", "ALIVE")]  # fmt: skip
            slurm.wait_until(lambda: complete(run_dir), "the first complete checkpoint",
                             patience(600), driver, interval=0.1)  # fmt: skip
            drain(cluster, nodes["node_b"])
            noticed = time.monotonic()
            slurm.wait_until(lambda: "preemption notice" in log.read_text(), "the notice",
                             patience(120), driver)  # fmt: skip
            notice_step = int(re.search(r"checkpoint at step (\d+)", log.read_text())[1])
            slurm.wait_until(lambda: notice_step in complete(run_dir), "its checkpoint",
                             patience(120), driver, interval=0.1)  # fmt: skip
            times["notice -> checkpoint"] = time.monotonic() - noticed
            os.kill(raylet_b, signal.SIGKILL)  # the reclaim
            killed, before = time.monotonic(), reads(read_log)
            slurm.wait_until(lambda: resumes(log), "the run on one worker",
                             patience(300), driver)  # fmt: skip
            steps_at_loss = len(metrics(run_dir))
            slurm.wait_until(lambda: len(metrics(run_dir)) > steps_at_loss, "a step on one",
                             patience(300), driver)  # fmt: skip
            times["node loss -> training again"] = time.monotonic() - killed
            assert "node_b" not in cluster.alive_nodes()  # it went on without waiting for B
            cluster.join("node_b")
            joined, raylet_b2 = time.monotonic(), group_pid(cluster.nodes[1].pid, "raylet")
            slurm.wait_until(lambda: len(resumes(log)) >= 2,
                             "the group to grow back", patience(300), driver)  # fmt: skip
            grown_at, middle = len(metrics(run_dir)), reads(read_log)[len(before) :]
            slurm.wait_until(lambda: len(metrics(run_dir)) > grown_at, "a step on two",
                             patience(300), driver)  # fmt: skip
            times["node back -> training on two"] = time.monotonic() - joined
            driver.wait(timeout=patience(600))
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    text = log.read_text()
    assert driver.returncode == 0, text[-4000:]
    print(f"elastic run: {json.dumps({k: round(v, 1) for k, v in times.items()})}")
    (tmp_path / "times.json").write_text(json.dumps(times))  # kept with the test's temp folder
    assert_one_worker_per_node(workers, nodes, before, raylet_a, raylet_b)
    # one worker (rank 0, on node A) read alone; after the regrowth a rank reads on the new B
    assert (0, raylet_a) in {(r, p) for r, p, _ in middle}, middle
    after = reads(read_log)[len(before) + len(middle) :]
    (moved,) = {r for r, p, _ in after if p == raylet_b2} or {None}
    assert moved is not None and (1 - moved, raylet_a) in {(r, p) for r, p, _ in after}, after
    resumed = resumes(log)
    assert [w for _, w in resumed] == ["1", "2"], text[-4000:]
    assert int(resumed[0][0]) == notice_step  # the notice's checkpoint, nothing older
    records = metrics(run_dir)
    assert {m["global_batch"] for m in records} == {8}, records
    sizes = [(m["world_size"], m["grad_accum"]) for m in records]
    assert set(sizes) == {(2, 1), (1, 2)} and sizes[-1] == (2, 1), sizes
    steps = [m["step"] for m in records]
    assert steps[-1] == MAX_STEPS
    # three segments, one per group size; each restart goes back to the checkpoint it resumed
    # from: the steps after it, logged before the restart, are run again (at most EVERY)
    cuts = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    assert len(cuts) == 2, sizes
    for (start, _), cut in zip(resumed, cuts, strict=True):
        assert steps[cut] == int(start) + 1, (start, steps)
        assert 0 <= steps[cut - 1] - int(start) <= EVERY, (start, steps)
    assert steps[cuts[0] : cuts[1]] == list(range(steps[cuts[0]], steps[cuts[1] - 1] + 1))
    final = torch.load(run_dir / f"step_{MAX_STEPS:08d}" / "client_state.pt", weights_only=False)
    assert final["samples_seen"] == MAX_STEPS * 8 and final["world_size"] == 2
    # until the first resize the two runs are the same computation: the same losses, bit for bit
    ref_losses = [m["loss/unet"] for m in metrics(reference.parents[1])]
    assert [m["loss/unet"] for m in records[: cuts[0]]] == ref_losses[: cuts[0]]

    # the final weights against the uninterrupted two-worker run's: not equal (after each change
    # of size the streams skip the rest of the shard reads in progress, and one worker's two
    # micro-batches differ from two workers' halves by rounding), but as near to them as
    # WEIGHTS_REL of how far training moved them from the start
    elastic = load_file(str(run_dir / "export" / "unet.safetensors"))
    ref = load_file(str(reference))
    init = initial_weights(urls, tmp_path / "init")
    moved, apart = distance(ref, init), distance(elastic, ref)
    print(f"final weights: {apart / moved:.3f} of the training's displacement {moved:.3f} apart")
    assert apart <= WEIGHTS_REL * moved
