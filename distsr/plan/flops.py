"""FLOPs of each call, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
(matmul, conv and attention FLOPs; elementwise ops count 0). The backward is run, not assumed:
a trained net's backward reaches its trainable parameters (and, through them, every layer above
the first trainable one), a frozen net's backward only its input; gradient checkpointing's
recomputed forward is part of the backward. The bytes of the tensors autograd saves for backward
(parameters excluded) are the activation estimate."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from distsr.plan.workload import Backward, Call
from distsr.recipes.base import frozen


@dataclass
class Count:
    label: str
    net: str
    grad: str
    times: int
    fwd: int  # per call
    bwd: int
    saved: int  # bytes saved for backward per call

    @property
    def total(self) -> int:
        return self.times * (self.fwd + self.bwd)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return []


def _saved_bytes(params: set[int]):
    total = [0]

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            total[0] += t.numel() * t.element_size()
        return t

    return total, pack


def count_call(call: Call, modules: dict) -> Count:
    """Forward (and for grad calls the backward) of one call, FLOPs and saved bytes."""
    params = {id(p) for p in modules[call.net].parameters()}
    if call.grad == "none":
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            call.run(False)
        return Count(call.label, call.net, call.grad, call.times, fc.get_total_flops(), 0, 0)
    saved, pack = _saved_bytes(params)
    weights = frozen(modules[call.net]) if call.grad == "input" else contextlib.nullcontext()
    with weights, FlopCounterMode(display=False) as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [o for o in _tensors(call.run(call.grad == "input")) if o.requires_grad]
        fwd = fc.get_total_flops()
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    bwd = fc.get_total_flops() - fwd
    return Count(call.label, call.net, call.grad, call.times, fwd, bwd, saved[0])


def count_calls(calls: list, modules: dict, seen: dict | None = None) -> list[Count]:
    """Counts of the calls in order. Calls sharing ``run`` and ``grad`` are counted once, and a
    no-grad call whose ``run`` was counted with grad reuses that forward (FLOPs of a forward do
    not depend on autograd). ``seen``: a memo shared between lists of the same workload."""
    seen = {} if seen is None else seen
    out = []
    for c in calls:
        if not isinstance(c, Call):
            continue
        key = (id(c.run), c.grad)
        if key not in seen:
            done = [n for (r, _), n in seen.items() if r == id(c.run)]
            if c.grad == "none" and done:
                seen[key] = dataclasses.replace(done[0], grad="none", bwd=0, saved=0)
            else:
                seen[key] = count_call(c, modules)
        out.append(dataclasses.replace(seen[key], label=c.label, times=c.times, grad=c.grad))
    return out


def peak_saved(step: list, counts: dict[str, Count]) -> int:
    """Largest sum of saved bytes alive at once: a call's graph lives from its forward until
    the backward of its update."""
    live, peak = {}, 0
    for item in step:
        if isinstance(item, Backward):
            peak = max(peak, sum(live.values()))
            live = {k: v for k, v in live.items() if k[0] != item.update}
        elif item.grad != "none":
            live[(item.update, item.label)] = counts[item.label].saved * item.times
    return max(peak, sum(live.values()))
