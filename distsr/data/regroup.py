"""Continue the training streams at another world size (an elastic run that lost or gained
workers) so that every sample the old ranks had consumed stays consumed.

Every reader reads shards at global indices g (``reader.global_read``), so the streams of all
ranks together walk g = 0, 1, 2, ... (each pass a permutation of the shards). The saved
position of a reader tells the last shard read it consumed samples from: ``upto`` (the last
read of its current shuffle block) while inside a block, else ``read`` when ``offset`` > 0
(finished blocks end inside or at the end of that read), none at ``START``. The new world's
streams start at ``base`` = one past the largest such g over every old reader: no consumed
sample is read again in that pass. What is skipped: the unread rest of the shard reads in
progress and the reads slower readers had not reached, at most ``slots * world_size`` shard
reads per change of size (each rank's readers advance at the same pace). The new streams keep
the run's seed (the same pass permutations), fresh positions, and their crop seeds.
"""

from __future__ import annotations

from distsr.data.reader import global_read


def last_consumed(position: dict) -> int:
    """The last shard read a reader consumed samples from, -1 for none."""
    if position.get("taken", 0) > 0:
        return position.get("upto", position["read"])
    return position["read"] if position["offset"] > 0 else position["read"] - 1


def next_base(states: list[dict]) -> int:
    """One past the largest global read any old reader consumed from (the old ``base`` when
    none consumed anything)."""
    ends = [state.get("base", 0) for state in states]
    for state in states:
        lay, base = state["layout"], state.get("base", 0)
        for slot, position in enumerate(state["positions"]):
            read = last_consumed(position)
            if read >= 0:
                g = global_read(base, read, slot, lay["slots"], lay["world_size"], lay["rank"])
                ends.append(g + 1)
    return max(ends)


def regrouped(states: list, rank: int, world_size: int) -> dict | None:
    """This rank's stream state from the saved ones of every old rank: its own when the world
    size is unchanged, else a state that starts fresh streams at ``next_base`` (the reader
    takes it as ``make_train_loader(state=...)``); None when nothing was saved."""
    if not states or any(s is None for s in states):
        return None
    if len(states) == world_size:
        return states[rank]
    return {"seed": states[0]["seed"], "base": next_base(states), "regrouped_from": len(states)}
